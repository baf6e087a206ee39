"""The Hugging Face Hub side of publishing: the token, the offline switch and the push.

The token comes from ``token=``, ``HF_TOKEN`` or the ``huggingface_hub`` login; it is never printed, logged or
written, and :func:`_scrub` takes it out of any error message.
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_specdef.publishing.errors import PublishError
from hf_specdef.storage.release_files import check_release_folder


def resolve_token(token: str | None = None) -> str | None:
    """The Hub token: ``token`` if given, else ``HF_TOKEN``, else the ``huggingface_hub`` login (never logged)."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def push_folder(folder: Path, repo_id: str, *, private: bool, token: str | None, commit_message: str) -> str:
    """``create_repo(exist_ok=True)`` then ``upload_folder``; returns the commit URL. Errors carry no token.

    The folder is checked against the release rule first (:func:`hf_specdef.storage.release_files.check_release_folder`):
    a weight file other than the protected checkpoint's (or an unprotected pipeline component's) refuses the push."""
    from huggingface_hub import HfApi

    bad = check_release_folder(folder)
    if bad:  # the folder was changed after it was written, or a bug: never push unprotected weights
        raise PublishError(f"refusing to push {folder}: it holds weight files that are not the protected checkpoint: "
                           f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; remove them, or publish again.")
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    except Exception as e:
        raise PublishError(_scrub(f"push to {repo_id!r} failed: {type(e).__name__}: {e}", token)) from None
    return str(getattr(info, "commit_url", None) or info)
