"""python -m services.joiner — joins impressions with clicks into labelled samples."""

from freshet.config import BusConfig, from_env
from freshet.runtime import run_service
from services.joiner.config import JoinerConfig
from services.joiner.service import JoinerService

if __name__ == "__main__":
    raise SystemExit(run_service("joiner", lambda: JoinerService(from_env(JoinerConfig), from_env(BusConfig))))
