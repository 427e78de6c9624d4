"""Shared training machinery: strategies, schedules, checkpoints, configs, the loop, images.

The binaries in `train/` parse flags into a config and call into this package; nothing here
reads flags.
"""

from tf_iresnet.training.checkpoint import CheckpointError, CheckpointState
from tf_iresnet.training.config import config_to_dict, read_config, write_config
from tf_iresnet.training.images import image_summary, make_image_grid, save_image_grid
from tf_iresnet.training.loop import Trainer
from tf_iresnet.training.schedules import WarmupSchedule
from tf_iresnet.training.strategy import (
    STRATEGY_NAMES,
    WorkerLostError,
    is_chief,
    make_strategy,
    parse_tf_config,
    task_info,
)

__all__ = [
    "STRATEGY_NAMES",
    "CheckpointError",
    "CheckpointState",
    "Trainer",
    "WarmupSchedule",
    "WorkerLostError",
    "config_to_dict",
    "image_summary",
    "is_chief",
    "make_image_grid",
    "make_strategy",
    "parse_tf_config",
    "read_config",
    "save_image_grid",
    "task_info",
    "write_config",
]
