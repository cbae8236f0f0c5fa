"""HTTP routes; each module holds one APIRouter. Wiring happens in ``deepvit.service.app``."""
