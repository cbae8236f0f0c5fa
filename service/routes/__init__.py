"""HTTP routes; each module holds one APIRouter. Wiring happens in ``service.app``."""
