"""python -m services.publisher — turns store changes into versioned deltas."""

from freshet.config import BusConfig, from_env
from freshet.runtime import run_service
from services.publisher.config import PublisherConfig
from services.publisher.service import PublisherService

if __name__ == "__main__":
    raise SystemExit(
        run_service("publisher", lambda: PublisherService(from_env(PublisherConfig), from_env(BusConfig)))
    )
