"""Progress bars and logging set-up shared by every stage (one place decides what the terminal shows)."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

_quiet = False


def configure_output(quiet: bool = False, verbose: bool = False) -> None:
    global _quiet
    _quiet = quiet
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    # transformers and datasets are chatty at INFO; keep their warnings only.
    for name in ("transformers", "datasets", "urllib3", "filelock", "httpx", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING if not verbose else logging.INFO)
    # huggingface_hub logs every retry of an unreachable hub as a warning (dozens of lines before the error,
    # which kdqa reports in one line); -v shows them.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR if not verbose else logging.INFO)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # e.g. the load report for a freshly initialised QA head


def progress(enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr; hidden with --quiet (and on every rank but 0, via `enabled`)."""
    return tqdm(disable=_quiet or not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=1.0, **kwargs)


def close_bars() -> None:
    """End every open progress bar on its own line, so that an error printed next starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
