"""The errors a user can act on.  Entry points print these as one line instead of a traceback.

Each module defines its own error class next to the code that raises it; this tuple collects the
ones whose message already says what to do.
"""

from __future__ import annotations


def _collect() -> tuple[type[BaseException], ...]:
    from eagle_dist.backbone import WeightsError
    from eagle_dist.config import ConfigError
    from eagle_dist.trainer import TrainingError

    found: list[type[BaseException]] = [ConfigError, WeightsError, TrainingError]
    # Optional modules: present in a full install, but an import problem there must not hide
    # the original error.
    for module, name in (
        ("eagle_dist.data", "DataError"),
        ("eagle_dist.shard", "ShardError"),
        ("eagle_dist.checkpoint", "CheckpointError"),
        ("eagle_dist.dist", "DistributedSetupError"),
    ):
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
        found.append(cls)
    return tuple(found)


USER_ERRORS = _collect()
