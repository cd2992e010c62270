"""python -m services.validator — approves or rejects every delta."""

from freshet.config import BusConfig, from_env
from freshet.runtime import run_service
from services.validator.config import ValidatorConfig
from services.validator.service import ValidatorService

if __name__ == "__main__":
    raise SystemExit(
        run_service("validator", lambda: ValidatorService(from_env(ValidatorConfig), from_env(BusConfig)))
    )
