"""Which RemoteStore a volume's S3 location gets: the passphrase only with ``s3_encrypt``."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugin.sync.remotes import Remotes
from s3sync import S3SyncError

ENV = {"S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "a",
       "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}


def test_an_encrypted_volume_without_s3_passphrase_gets_no_store(tmp_path: Path) -> None:
    remotes = Remotes(tmp_path, dict(ENV))
    with pytest.raises(S3SyncError, match="S3_PASSPHRASE is not set") as err:
        remotes.get("b", "v", encrypt=True)
    assert "docker plugin set pyvol S3_PASSPHRASE" in str(err.value)
    assert remotes.cached(("b", "v")) is None
    assert not remotes.get("b", "v", encrypt=False).encrypted


def test_the_passphrase_goes_only_to_encrypted_volumes_and_is_never_shown(
        tmp_path: Path) -> None:
    remotes = Remotes(tmp_path, {**ENV, "S3_PASSPHRASE": "hunter2-passphrase"})
    sealed = remotes.get("b", "v", encrypt=True)
    plain = remotes.get("b", "w", encrypt=False)
    assert sealed._passphrase == "hunter2-passphrase"
    assert plain._passphrase is None
    assert remotes.cached(("b", "v")) is sealed
    assert "hunter2" not in repr(sealed) and "hunter2" not in repr(sealed._remote)
