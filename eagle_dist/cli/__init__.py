"""Thin command-line tools.  Each module has `main(argv) -> exit status`; `eagle_dist.cli.main`
dispatches the `eagle-dist` console script to them.  No tool imports another tool."""
