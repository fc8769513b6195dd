"""The one options parser: normalise, type, range-check, refuse unknown keys and credentials."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from backends.base import BackendOption, Capabilities, DirSpec
from backends.local import LocalBackend
from plugin.errors import InvalidOption
from plugin.options import VALID_KEYS, VolumeOptions, parse_options, with_default_encrypt
from plugin.settings import Settings

BACKENDS = {"local": LocalBackend}


def parse(raw: object, default_backend: str = "local",
          backends: object = BACKENDS) -> VolumeOptions:
    return parse_options(raw, default_backend=default_backend,  # type: ignore[arg-type]
                         backends=backends)


def refused(raw: object, **kwargs: object) -> str:
    with pytest.raises(InvalidOption) as excinfo:
        parse(raw, **kwargs)  # type: ignore[arg-type]
    return str(excinfo.value)


@pytest.mark.parametrize("raw", [None, {}])
def test_defaults(raw: dict[str, str] | None) -> None:
    assert parse(raw) == VolumeOptions(backend="local", uid=None, gid=None, mode=0o755)
    assert parse(raw).dir_spec() == DirSpec(uid=None, gid=None, mode=0o755)


def test_every_option() -> None:
    opts = parse({"backend": "local", "uid": "1000", "gid": "2000", "mode": "0750"})
    assert opts == VolumeOptions(backend="local", uid=1000, gid=2000, mode=0o750)
    assert opts.dir_spec() == DirSpec(uid=1000, gid=2000, mode=0o750)
    assert opts.describe() == {"backend": "local", "uid": "1000", "gid": "2000", "mode": "0750"}


@pytest.mark.parametrize("raw", [
    {"UID": "7"}, {"Uid": "7"}, {" uid ": "7"}, {"uid": " 7 "}, {"\tUID\n": "7"},
])
def test_keys_and_values_normalised(raw: dict[str, str]) -> None:
    assert parse(raw).uid == 7


def test_dash_and_underscore_are_the_same_key() -> None:
    # No current option has an underscore, so the effect shows in what the errors name.
    assert "'some_thing'" in refused({"Some-Thing": "1"})
    assert "given twice" in refused({"some-thing": "1", "SOME_THING": "2"})


def test_same_key_twice_after_normalisation() -> None:
    message = refused({"uid": "1", "UID": "2"})
    assert "'uid'" in message
    assert "given twice" in message


@pytest.mark.parametrize(("value", "mode"), [
    ("0755", 0o755), ("755", 0o755), ("0o755", 0o755), ("0O755", 0o755), (" 0750 ", 0o750),
    ("0", 0), ("0000", 0), ("700", 0o700), ("2775", 0o2775), ("7777", 0o7777),
    ("0o7777", 0o7777),
])
def test_mode_octal_forms(value: str, mode: int) -> None:
    assert parse({"mode": value}).mode == mode


def test_equal_modes_written_differently_parse_equal() -> None:
    assert parse({"mode": "755"}) == parse({"Mode": "0755"}) == parse({"mode": "0o755"})
    assert parse({"mode": "0755"}) == parse(None)  # 0755 is the default


@pytest.mark.parametrize("value", ["8", "9", "0o8", "0x1ff", "rwxr-xr-x", "", "0o", "-1",
                                   "10000", "0o10000", "7.5", "u+x"])
def test_mode_refused(value: str) -> None:
    message = refused({"mode": value})
    assert "mode" in message
    assert "0750" in message or "7777" in message  # says what a valid value looks like


@pytest.mark.parametrize(("key", "value", "number"), [
    ("uid", "0", 0), ("uid", "1000", 1000), ("uid", "4294967294", 2**32 - 2),
    ("gid", "0", 0), ("gid", "65534", 65534), ("gid", "4294967294", 2**32 - 2),
])
def test_ids_in_range(key: str, value: str, number: int) -> None:
    assert getattr(parse({key: value}), key) == number


@pytest.mark.parametrize("key", ["uid", "gid"])
@pytest.mark.parametrize("value", ["-1", "4294967295", "99999999999", "abc", "", "1.5",
                                   "0x10", "1e3", "root"])
def test_ids_refused(key: str, value: str) -> None:
    message = refused({key: value})
    assert key in message
    assert "4294967294" in message  # names the valid range


def test_unknown_key_names_it_and_lists_valid_ones() -> None:
    message = refused({"colour": "blue"})
    assert "unknown option 'colour'" in message
    assert f"valid options for backend local are: {', '.join(sorted(VALID_KEYS))}" in message
    for key in ("backend", "uid", "gid", "mode"):
        assert key in VALID_KEYS


class _Sized:
    capabilities = Capabilities(size_limit=True)
    options = (BackendOption("size", lambda text: int(text.rstrip("G")) * 2**30, "limit",
                             show=lambda n: f"{n // 2**30} GiB"),)


class _Plain:
    capabilities = Capabilities()
    options: tuple[BackendOption, ...] = ()


SIZED = {"local": _Plain(), "image": _Sized()}


def test_a_backend_option_alone_picks_the_backend_that_takes_it() -> None:
    options = parse_options({"size": "10G"}, default_backend="local", backends=SIZED)
    assert options.backend == "image"
    assert options.param("size") == 10 * 2**30
    assert options.dir_spec().params == {"size": 10 * 2**30}
    assert options.describe()["size"] == "10 GiB"


def test_a_backend_that_cannot_limit_refuses_size_and_says_which_can() -> None:
    with pytest.raises(InvalidOption) as err:
        parse_options({"backend": "local", "size": "1G"}, default_backend="local",
                      backends=SIZED)
    assert str(err.value) == ("option 'size' is not supported by backend local (it cannot "
                              "enforce a size limit); backend image takes it: omit -o backend")


def test_an_unknown_key_lists_the_selected_backends_own_keys() -> None:
    with pytest.raises(InvalidOption) as err:
        parse_options({"backend": "image", "colour": "red"}, default_backend="local",
                      backends=SIZED)
    assert str(err.value) == ("unknown option 'colour'; valid options for backend image are: "
                              + ", ".join(sorted([*VALID_KEYS, "size"])))


def test_a_bad_backend_option_value_names_the_key() -> None:
    def parse(text: str) -> int:
        raise ValueError("must be a size with a unit such as 10G")
    sized = _Sized()
    sized.options = (BackendOption("size", parse, "limit"),)  # type: ignore[misc]
    with pytest.raises(InvalidOption) as err:
        parse_options({"size": "ten"}, default_backend="local",
                      backends={"local": _Plain(), "image": sized})
    assert str(err.value) == "option size='ten': must be a size with a unit such as 10G"


@pytest.mark.parametrize("key", [
    "password", "PASSWORD", "passwd", "secret", "aws_secret_access_key", "AWS_ACCESS_KEY_ID",
    "access-key", "Secret-Key", "token", "api-token", "credentials", "s3_credential",
    "s3_passphrase", "Passphrase",
])
def test_credential_keys_refused_pointing_at_plugin_set(key: str) -> None:
    message = refused({key: "hunter2-very-secret"})
    assert "docker plugin set" in message
    assert "credential" in message
    assert "hunter2" not in message  # the value must never be echoed into Err or logs


@pytest.mark.parametrize(("raw", "named"), [
    ({"uid": 1000}, "'uid'"),
    ({"uid": None}, "'uid'"),
    ({"mode": 0o755}, "'mode'"),
    ({"gid": ["1"]}, "'gid'"),
    ({"backend": {"name": "local"}}, "'backend'"),
    ({"uid": True}, "'uid'"),
    ({1: "x"}, "1"),
])
def test_non_string_values_refused(raw: dict[object, object], named: str) -> None:
    message = refused(raw)
    assert named in message
    assert "string" in message


def test_input_never_mutated() -> None:
    raw = {" UID ": " 1000 ", "Mode": "0o750", "GID": "5"}
    before = dict(raw)
    parse(raw)
    assert raw == before
    # A read-only mapping works too, so the parser cannot be writing into its input.
    assert parse(MappingProxyType(raw)) == VolumeOptions(uid=1000, gid=5, mode=0o750)


def test_default_backend_used_and_overridable() -> None:
    both = {"local": LocalBackend, "other": LocalBackend}
    assert parse({}, default_backend="other", backends=both).backend == "other"
    assert parse({"backend": "local"}, default_backend="other", backends=both).backend == "local"
    assert parse({"backend": " local "}, default_backend="other", backends=both).backend == "local"
    assert parse({"backend": ""}, default_backend="other", backends=both).backend == "other"


def test_default_backend_from_plugin_settings(tmp_path: Path) -> None:
    settings = Settings.from_env({"DEFAULT_BACKEND": " other "}, root=tmp_path, socket=tmp_path)
    assert settings.default_backend == "other"
    assert Settings.from_env({}, root=tmp_path, socket=tmp_path).default_backend == "local"


@pytest.mark.parametrize("raw", [{"backend": "nope"}, {"BACKEND": "nope"}])
def test_unknown_backend_names_it_and_lists_available(raw: dict[str, str]) -> None:
    message = refused(raw, backends={"local": LocalBackend, "other": LocalBackend})
    assert "'nope'" in message
    assert "available: local, other" in message


def test_unknown_default_backend_is_refused() -> None:
    message = refused({}, default_backend="s3")
    assert "'s3'" in message
    assert "available: local" in message


def test_snapshot_names_are_capped_so_every_derived_file_name_fits() -> None:
    from plugin.errors import InvalidName
    from plugin.snapshotting import validate_snapshot_name

    assert validate_snapshot_name("s" * 200) == "s" * 200
    for length in (201, 246, 255):
        with pytest.raises(InvalidName, match="use 1-200 characters"):
            validate_snapshot_name("s" * length)
    assert len(f".{'s' * 200}.json.tmp".encode()) <= 255


def _s3(raw: dict[str, str], passphrase_set: bool | None) -> VolumeOptions:
    return parse_options({"s3_bucket": "b", **raw}, default_backend="local", backends=BACKENDS,
                         volume="v", passphrase_set=passphrase_set)


@pytest.mark.parametrize(("value", "wanted"), [("true", True), ("on", True), ("false", False)])
def test_s3_encrypt_is_a_boolean_and_off_by_default(value: str, wanted: bool) -> None:
    assert _s3({"s3_encrypt": value}, passphrase_set=True).s3.encrypt is wanted  # type: ignore[union-attr]
    assert _s3({}, passphrase_set=False).s3.encrypt is False  # type: ignore[union-attr]


def test_s3_encrypt_without_a_passphrase_is_refused_at_create_saying_what_to_set() -> None:
    with pytest.raises(InvalidOption, match="S3_PASSPHRASE") as err:
        _s3({"s3_encrypt": "true"}, passphrase_set=False)
    assert "docker plugin set" in str(err.value)
    assert _s3({"s3_encrypt": "false"}, passphrase_set=False).s3 is not None
    # A stored record parsed again (no passphrase_set) still loads if the setting was unset.
    assert _s3({"s3_encrypt": "true"}, passphrase_set=None).s3.encrypt  # type: ignore[union-attr]


@pytest.mark.parametrize(("raw", "passphrase_set", "wanted"), [
    ({"s3_bucket": "b"}, True, {"s3_bucket": "b", "s3_encrypt": "true"}),
    ({"S3_Keep": "3"}, True, {"S3_Keep": "3", "s3_encrypt": "true"}),
    ({"s3_bucket": "b", "s3_encrypt": "false"}, True, {"s3_bucket": "b", "s3_encrypt": "false"}),
    ({"s3_bucket": "b"}, False, {"s3_bucket": "b"}),
    ({"size": "1G"}, True, {"size": "1G"}),
    (None, True, {}),
])
def test_s3_encrypt_defaults_on_for_synced_volumes_when_a_passphrase_is_set(
        raw: dict[str, str] | None, passphrase_set: bool, wanted: dict[str, str]) -> None:
    got = with_default_encrypt(raw, passphrase_set=passphrase_set)
    assert dict(got) == wanted
    if raw and any(k.lower().startswith("s3_") for k in raw):
        parsed = _s3(dict(got), passphrase_set=passphrase_set)
        assert parsed.s3 is not None
        assert parsed.s3.encrypt is (got.get("s3_encrypt") == "true")
