"""python -m services.predictor — serves Predict from a replica that follows approved deltas."""

from freshet.config import BusConfig, from_env
from freshet.runtime import run_service
from services.predictor.config import PredictorConfig
from services.predictor.service import PredictorService

if __name__ == "__main__":
    raise SystemExit(
        run_service("predictor", lambda: PredictorService(from_env(PredictorConfig), from_env(BusConfig)))
    )
