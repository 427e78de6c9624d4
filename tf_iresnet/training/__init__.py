"""Shared training machinery: strategies, schedules, checkpoints, configs, the loop, images.

The binaries in `train/` parse flags into a config and call into this package; nothing here
reads flags.
"""

from tf_iresnet.training.checkpoint import CheckpointError, CheckpointState
from tf_iresnet.training.config import config_to_dict, read_config, write_config
from tf_iresnet.training.images import image_summary, make_image_grid, save_image_grid
from tf_iresnet.training.loop import NonFiniteLossError, Trainer
from tf_iresnet.training.run_dir import (
    RunDirError,
    RunLock,
    check_output_dirs,
    swap_in_directory,
)
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
    "NonFiniteLossError",
    "RunDirError",
    "RunLock",
    "Trainer",
    "WarmupSchedule",
    "WorkerLostError",
    "check_output_dirs",
    "config_to_dict",
    "image_summary",
    "is_chief",
    "make_image_grid",
    "make_strategy",
    "parse_tf_config",
    "read_config",
    "save_image_grid",
    "swap_in_directory",
    "task_info",
    "write_config",
]
