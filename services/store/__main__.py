"""python -m services.store — one embedding store shard."""

from freshet.config import from_env
from freshet.runtime import run_service
from services.store.config import StoreConfig
from services.store.service import StoreService

if __name__ == "__main__":
    raise SystemExit(run_service("store", lambda: StoreService(from_env(StoreConfig))))
