"""python -m services.trainer — trains the model on the sample stream."""

from freshet.config import BusConfig, from_env
from freshet.runtime import run_service
from services.trainer.config import TrainerConfig
from services.trainer.service import TrainerService

if __name__ == "__main__":
    raise SystemExit(run_service("trainer", lambda: TrainerService(from_env(TrainerConfig), from_env(BusConfig))))
