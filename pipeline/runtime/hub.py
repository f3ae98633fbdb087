"""The Hugging Face hub, when it cannot be reached: find out at once, use the local cache, say what to do.

Without `HF_HUB_OFFLINE=1`, huggingface_hub retries every request on a network error with exponential
backoff (five retries per file, several files per model): close to a minute and dozens of log lines before
the real error. So before the first hub lookup kdqa sends one short request to the hub; if it gets no
answer, the process switches huggingface_hub and datasets to offline mode, where anything in the local
cache still loads and anything else fails at once. The error then says how to run offline.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

PROBE_SECONDS = 5.0
OFFLINE_HELP = ("the hub cannot be reached from here (or HF_HUB_OFFLINE is set) and it is not in the local cache; "
                "to run offline point teacher.model / student.model (or --model) at a local model folder and "
                "data.train / data.dev at SQuAD JSON files in params.yaml (README.md: 'An offline example')")


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def hub_reachable() -> bool:
    """One request to the hub's endpoint (proxy settings apply); any HTTP answer at all means reachable."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_SECONDS, follow_redirects=False)
    except Exception as exc:  # connection refused, no DNS, timeout, proxy errors...
        log.info("%s cannot be reached (%s): using the local Hugging Face cache only", constants.ENDPOINT,
                 type(exc).__name__)
        return False
    return True


def use_cache_only_if_unreachable() -> None:
    """Before a hub lookup: switch this process to offline mode when the hub does not answer."""
    if is_offline() or hub_reachable():
        return
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config
    except ImportError:
        return
    datasets.config.HF_HUB_OFFLINE = True
