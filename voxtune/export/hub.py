"""Uploading an export folder to the Hugging Face Hub (its model card included)."""

from __future__ import annotations

from pathlib import Path

from voxtune.errors import InputError


def push(folder: Path, repo: str, *, private: bool = False) -> str:
    """Create `repo` (a model repo, if missing) and upload `folder` to it; returns its URL.
    The token is huggingface_hub's (`HF_TOKEN` or `hf auth login`)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo, repo_type="model", commit_message="Upload a voxtune export"
        )
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise InputError(f"cannot upload {folder} to the Hub repo {repo}: {str(error).splitlines()[0]}") from None
    return str(url)
