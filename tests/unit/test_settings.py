"""Unit tests of :mod:`watcher.settings`, through an explicit mapping, never ``os.environ``."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from watcher.errors import ConfigError
from watcher.models import Kind, ProjectRef
from watcher.settings import (
    Settings,
    configured,
    load_settings,
    reread_secret_files,
    unknown_variables,
)

TOKEN = "mhk_live_Zq8sECRETsECRETsECRET0042"


def _config_error(environ: dict[str, str]) -> str:
    """The message of the ConfigError that ``environ`` must cause."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return str(caught.value)


def _assert_token_hidden(text: str) -> None:
    assert TOKEN not in text
    assert "sECRET" not in text  # not even a fragment


def test_defaults() -> None:
    """An empty environment gives the documented defaults."""
    settings = load_settings({})
    assert settings.api_token is None
    assert str(settings.api_base_url) == "https://api.magichour.ai/"
    assert settings.projects == ""
    assert settings.project_refs == []
    assert settings.download_dir == Path("downloads")
    assert settings.database_url == "sqlite:///./watcher.db"
    assert settings.delete_after_download is False
    assert settings.poll_initial == 2.0
    assert settings.poll_max == 60.0
    assert settings.max_concurrent_requests == 8
    assert settings.max_concurrent_downloads == 4
    assert settings.max_requests_per_second == 50.0
    assert settings.request_timeout == 30.0
    assert settings.shutdown_grace == 30.0
    assert settings.log_format is None
    assert settings.log_level == "info"
    assert settings.http_enabled is True
    assert settings.http_host == "127.0.0.1"
    assert settings.http_is_loopback is True
    assert settings.http_port == 8080
    assert settings.lease_seconds == 60.0
    assert settings.replica_id


def test_values_are_read_from_the_mapping(tmp_path: Path) -> None:
    """Each ``WATCHER_*`` variable sets its setting, converted to the setting's type."""
    settings = load_settings(
        {
            "WATCHER_API_TOKEN": TOKEN,
            "WATCHER_API_BASE_URL": "http://127.0.0.1:9000",
            "WATCHER_PROJECTS": "video:v1, a1",
            "WATCHER_DOWNLOAD_DIR": str(tmp_path),
            "WATCHER_DATABASE_URL": f"sqlite:///{tmp_path}/w.db",
            "WATCHER_DELETE_AFTER_DOWNLOAD": "true",
            "WATCHER_POLL_INITIAL": "0.5",
            "WATCHER_POLL_MAX": "0.5",
            "WATCHER_MAX_CONCURRENT_REQUESTS": "16",
            "WATCHER_LOG_LEVEL": "DEBUG",
            "WATCHER_LOG_FORMAT": "JSON",
            "WATCHER_HTTP_HOST": "0.0.0.0",  # noqa: S104 - a value under test, nothing listens
            "WATCHER_HTTP_PORT": "0",
        }
    )
    assert settings.require_token().get_secret_value() == TOKEN
    assert str(settings.api_base_url) == "http://127.0.0.1:9000/"
    assert settings.project_refs == [ProjectRef(Kind.VIDEO, "v1"), ProjectRef(Kind.IMAGE, "a1")]
    assert settings.download_dir == tmp_path
    assert settings.delete_after_download is True
    assert (settings.poll_initial, settings.poll_max) == (0.5, 0.5)
    assert settings.max_concurrent_requests == 16
    assert settings.log_level == "debug"
    assert settings.log_format == "json"
    assert settings.http_is_loopback is False
    assert settings.http_port == 0


def test_empty_log_format_means_automatic() -> None:
    """An empty ``WATCHER_LOG_FORMAT`` picks the format automatically."""
    assert load_settings({"WATCHER_LOG_FORMAT": ""}).log_format is None


def test_lowercase_variable_names_are_read() -> None:
    """Variable names are case-insensitive, as in the process environment reader."""
    assert load_settings({"watcher_poll_max": "7"}).poll_max == 7.0


def test_other_variables_are_ignored() -> None:
    """Variables without the ``WATCHER_`` prefix have no effect."""
    settings = load_settings({"POLL_MAX": "1", "HOME": "/root", "API_TOKEN": TOKEN})
    assert settings.poll_max == 60.0
    assert settings.api_token is None


BAD_VALUES = {
    "WATCHER_API_BASE_URL": "not a url",
    "WATCHER_PROJECTS": "../x",
    "WATCHER_DATABASE_URL": "mysql://db.example/watcher",
    "WATCHER_DELETE_AFTER_DOWNLOAD": "maybe",
    "WATCHER_POLL_INITIAL": "0",
    "WATCHER_POLL_MAX": "abc",
    "WATCHER_MAX_CONCURRENT_REQUESTS": "0",
    "WATCHER_MAX_CONCURRENT_DOWNLOADS": "257",
    "WATCHER_MAX_REQUESTS_PER_SECOND": "-5",
    "WATCHER_REQUEST_TIMEOUT": "100000",
    "WATCHER_SHUTDOWN_GRACE": "-1",
    "WATCHER_LOG_FORMAT": "xml",
    "WATCHER_LOG_LEVEL": "verbose",
    "WATCHER_HTTP_ENABLED": "perhaps",
    "WATCHER_HTTP_PORT": "65536",
    "WATCHER_REPLICA_ID": "r" * 201,
    "WATCHER_LEASE_SECONDS": "1",
}


@pytest.mark.parametrize(("variable", "value"), list(BAD_VALUES.items()))
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    """A bad value gives a one-line ConfigError that starts with the variable's name."""
    message = _config_error({variable: value})
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_every_bad_setting_gets_its_own_line() -> None:
    """With many bad values, the error has exactly one line per bad setting."""
    lines = _config_error({**BAD_VALUES, "WATCHER_API_TOKEN": TOKEN}).splitlines()
    assert sorted(line.split(":", 1)[0] for line in lines) == sorted(BAD_VALUES)


def test_bad_value_is_shown_but_cut_short() -> None:
    """The offending value is quoted to help the operator, but a huge one is shortened."""
    assert "(got 'verbose')" in _config_error({"WATCHER_LOG_LEVEL": "verbose"})
    message = _config_error({"WATCHER_HTTP_PORT": "9" * 500})
    assert "9" * 80 + "…" in message
    assert "9" * 81 not in message


def test_database_url_is_not_echoed() -> None:
    """A refused database URL is not printed back: it may carry a password."""
    message = _config_error({"WATCHER_DATABASE_URL": "mysql://watcher:hunter2@db/watcher"})
    assert message.startswith("WATCHER_DATABASE_URL: ")
    assert "hunter2" not in message


def test_bad_project_list_reports_every_bad_entry() -> None:
    """A bad ``WATCHER_PROJECTS`` names each bad entry on the variable's line."""
    message = _config_error({"WATCHER_PROJECTS": "ok1, ../x, gif:abc, ok2, /etc/passwd"})
    assert message.startswith("WATCHER_PROJECTS: ")
    for bad in ("'../x'", "'gif'", "'/etc/passwd'"):
        assert bad in message


def test_poll_max_below_poll_initial() -> None:
    """A maximum below the initial delay is refused, naming both variables."""
    message = _config_error({"WATCHER_POLL_INITIAL": "10", "WATCHER_POLL_MAX": "5"})
    assert message == "WATCHER_POLL_MAX (5) must not be below WATCHER_POLL_INITIAL (10)"


@pytest.mark.parametrize(
    ("environ", "shown"),
    [
        (
            {"WATCHER_LEASE_SECONDS": "10", "WATCHER_STORE_TIMEOUT": "6"},
            "(6) must be at most half of WATCHER_LEASE_SECONDS (10)",
        ),
        (
            {"WATCHER_STORE_TIMEOUT": "30.5"},
            "(30.5) must be at most half of WATCHER_LEASE_SECONDS (60)",
        ),
    ],
)
def test_a_store_timeout_over_half_a_lease_is_refused(environ: dict[str, str], shown: str) -> None:
    """A database call allowed longer than half a lease could renew it after it ran out: a
    store timeout set over half the lease (the default lease's too) is refused, naming both."""
    assert _config_error(environ) == f"WATCHER_STORE_TIMEOUT {shown}"


@pytest.mark.parametrize(
    ("environ", "store_timeout"),
    [
        ({}, 10.0),
        ({"WATCHER_LEASE_SECONDS": "30"}, 10.0),
        ({"WATCHER_LEASE_SECONDS": "10"}, 5.0),
        ({"WATCHER_LEASE_SECONDS": "5"}, 2.5),
        ({"WATCHER_LEASE_SECONDS": "10", "WATCHER_STORE_TIMEOUT": "5"}, 5.0),
        ({"WATCHER_LEASE_SECONDS": "10", "WATCHER_STORE_TIMEOUT": "0.5"}, 0.5),
    ],
)
def test_an_unset_store_timeout_follows_a_short_lease(
    environ: dict[str, str], store_timeout: float
) -> None:
    """Unset, the store timeout is 10 s or half the lease if that is shorter: a lease alone is
    never refused; half a lease set explicitly is fine."""
    assert load_settings(environ).store_timeout == store_timeout


def test_poll_max_equal_to_poll_initial_is_fine() -> None:
    """Equal bounds (a fixed poll interval) are allowed."""
    assert load_settings({"WATCHER_POLL_INITIAL": "3", "WATCHER_POLL_MAX": "3"}).poll_max == 3


def test_token_is_read_from_a_file(tmp_path: Path) -> None:
    """``WATCHER_API_TOKEN_FILE`` supplies the token, without surrounding whitespace."""
    secret = tmp_path / "token"
    secret.write_text(f"  {TOKEN}\n", "utf-8")
    settings = load_settings({"WATCHER_API_TOKEN_FILE": str(secret)})
    assert settings.require_token().get_secret_value() == TOKEN


def test_missing_token_file(tmp_path: Path) -> None:
    """A token file that cannot be read is reported under its variable, with the reason."""
    missing = tmp_path / "nope"
    message = _config_error({"WATCHER_API_TOKEN_FILE": str(missing)})
    assert message.startswith("WATCHER_API_TOKEN_FILE: ")
    assert "No such file" in message


def test_a_token_put_in_the_file_variable_is_not_echoed() -> None:
    """An operator who sets WATCHER_API_TOKEN_FILE to the token itself does not see it printed."""
    message = _config_error({"WATCHER_API_TOKEN_FILE": "mhk_live_oops_the_token"})
    assert message.startswith("WATCHER_API_TOKEN_FILE: ")
    assert "mhk_live_oops_the_token" not in message


def test_empty_token_file(tmp_path: Path) -> None:
    """A token file holding only whitespace is refused."""
    empty = tmp_path / "token"
    empty.write_text(" \n\n", "utf-8")
    message = _config_error({"WATCHER_API_TOKEN_FILE": str(empty)})
    assert message.startswith("WATCHER_API_TOKEN_FILE: ")
    assert "empty" in message


def test_token_and_token_file_together(tmp_path: Path) -> None:
    """Setting both the token and its file is refused, naming both, and shows neither secret."""
    secret = tmp_path / "token"
    secret.write_text(TOKEN, "utf-8")
    message = _config_error({"WATCHER_API_TOKEN": TOKEN, "WATCHER_API_TOKEN_FILE": str(secret)})
    assert "WATCHER_API_TOKEN " in message
    assert "WATCHER_API_TOKEN_FILE" in message
    assert "not both" in message
    _assert_token_hidden(message)


def test_require_token_without_one() -> None:
    """Running needs a token; a missing or blank one is a ConfigError naming the variable."""
    for environ in ({}, {"WATCHER_API_TOKEN": ""}, {"WATCHER_API_TOKEN": "   "}):
        with pytest.raises(ConfigError, match=r"^WATCHER_API_TOKEN: required"):
            load_settings(environ).require_token()


def test_token_never_appears_in_repr_or_dumps(tmp_path: Path) -> None:
    """Neither repr, str nor a JSON dump of the settings reveals the token."""
    direct = load_settings({"WATCHER_API_TOKEN": TOKEN})
    secret = tmp_path / "token"
    secret.write_text(TOKEN, "utf-8")
    from_file = load_settings({"WATCHER_API_TOKEN_FILE": str(secret)})
    for settings in (direct, from_file):
        assert settings.api_token is not None
        _assert_token_hidden(repr(settings))
        _assert_token_hidden(str(settings))
        _assert_token_hidden(settings.model_dump_json())
        _assert_token_hidden(repr(settings.api_token))


def test_token_never_appears_in_config_errors() -> None:
    """Errors about other settings do not print the token, whatever else is wrong."""
    message = _config_error({**BAD_VALUES, "WATCHER_API_TOKEN": TOKEN})
    _assert_token_hidden(message)


def test_unknown_variables_are_the_likely_typos() -> None:
    """Only ``WATCHER_*`` names that match no setting are reported, sorted, values not shown."""
    environ = {
        "WATCHER_API_TOKN": TOKEN,
        "WATCHER_POLL_MAX": "3",
        "watcher_poll_intial": "1",
        "WATCHER_API_TOKEN_FILE": "/run/secrets/token",
        "PATH": "/usr/bin",
        "WATCHERS": "x",
    }
    unknown = unknown_variables(environ)
    assert unknown == ["WATCHER_API_TOKN", "watcher_poll_intial"]
    _assert_token_hidden(repr(unknown))


def test_unknown_variables_do_not_stop_loading() -> None:
    """A typo'd variable is ignored by the loader (the CLI warns about it separately)."""
    assert load_settings({"WATCHER_POLL_MAXX": "1"}).poll_max == 60.0


def test_every_setting_has_a_variable() -> None:
    """Each setting is reachable as ``WATCHER_<NAME>`` (so unknown_variables is exact)."""
    environ = {f"WATCHER_{name.upper()}": "x" for name in Settings.model_fields}
    assert unknown_variables(environ) == []


SECRETS = {
    "WATCHER_API_TOKEN": "mhk_live_api_secret",
    "WATCHER_CONTROL_TOKEN": "control-secret-value",
    "WATCHER_WEBHOOK_SECRET": "webhook-secret-value",
    "WATCHER_NOTIFY_SECRET": "notify-secret-value",
}


UNREADABLE = {"kind": "postgresql", "host": None}


@pytest.mark.parametrize(
    ("url", "store"),
    [
        (
            "postgresql://watcher:db-pass-secret@db.internal:6432/fleet?sslmode=require",
            {
                "kind": "postgresql",
                "host": "db.internal",
                "port": 6432,
                "database": "fleet",
                "user": "watcher",
            },
        ),
        (
            "postgresql://db.internal/fleet?password=db-pass-secret",
            {
                "kind": "postgresql",
                "host": "db.internal",
                "port": None,
                "database": "fleet",
                "user": None,
            },
        ),
        ("postgresql://watcher:db-pass-secret@db.internal:bad/fleet", UNREADABLE),
        ("postgresql://watcher:db-pass/secret@db.internal/fleet", UNREADABLE),
        ("postgresql://watcher:6432?db-pass@db.internal/fleet", UNREADABLE),
        ("postgresql://watcher:6432#db-pass@db.internal/fleet", UNREADABLE),
        ("memory://", {"kind": "memory"}),
    ],
)
def test_the_summary_names_the_store_without_its_password(
    url: str, store: dict[str, object]
) -> None:
    """The start-up summary says which store and where, never the URL's password (not even of
    a malformed URL), and never a token or secret: those show only as set or not."""
    settings = load_settings(
        {
            **SECRETS,
            "WATCHER_DATABASE_URL": url,
            "WATCHER_NOTIFY_URL": "https://user:notify-pass-secret@hooks.example/in?key=q-secret",
            "WATCHER_API_BASE_URL": "https://api.example:8443/base",
        }
    )
    summary = settings.summary()
    assert summary["store"] == store
    assert summary["api_base_url"] == "https://api.example:8443/base"
    assert summary["notify_url"] == "https://hooks.example/in"
    assert summary["control_token"] is True
    assert summary["webhooks"] is True
    assert summary["max_requests_per_second"] == 50.0
    text = repr(summary)
    for secret in [*SECRETS.values(), "db-pass", "secret@", "notify-pass", "q-secret"]:
        assert secret not in text, secret


def test_the_summary_of_a_sqlite_store_gives_its_absolute_path(tmp_path: Path) -> None:
    """A SQLite store is named with the absolute path of its file; unset secrets say False."""
    settings = load_settings({"WATCHER_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"})
    summary = settings.summary()
    assert summary["store"] == {"kind": "sqlite", "path": str(tmp_path / "w.db")}
    assert summary["control_token"] is False
    assert summary["notify_url"] is None


def test_an_empty_replica_id_means_the_default() -> None:
    """``WATCHER_REPLICA_ID=`` (empty, as the example env file shows it) is the default name,
    not a start-up error."""
    assert load_settings({"WATCHER_REPLICA_ID": ""}).replica_id == Settings().replica_id


@pytest.mark.parametrize(
    "url",
    ["https://api.magichour.ai/v1", "https://api.magichour.ai/v1/", "http://127.0.0.1:9/x/V1"],
)
def test_a_base_url_ending_in_v1_is_refused(url: str) -> None:
    """The client adds ``/v1/...`` itself: a base URL ending in ``/v1`` would make every
    project ``not_found``, so it is refused with what to use instead."""
    message = _config_error({"WATCHER_API_BASE_URL": url})
    assert message.startswith("WATCHER_API_BASE_URL: must not end in /v1")
    assert f"(use {url.rstrip('/')[:-3]})" in message


def test_a_base_url_with_v1_elsewhere_is_fine() -> None:
    """Only a trailing ``/v1`` is refused."""
    settings = load_settings({"WATCHER_API_BASE_URL": "https://proxy.test/v1x/magic"})
    assert str(settings.api_base_url) == "https://proxy.test/v1x/magic"


def test_secret_files_are_read_again(tmp_path: Path) -> None:
    """``reread_secret_files`` reads every ``*_FILE`` secret again and names those that
    changed; secrets given directly are left alone."""
    token, control = tmp_path / "token", tmp_path / "control"
    token.write_text(TOKEN + "\n")
    control.write_text("control-secret-1\n")
    settings = load_settings(
        {
            "WATCHER_API_TOKEN_FILE": str(token),
            "WATCHER_CONTROL_TOKEN_FILE": str(control),
            "WATCHER_WEBHOOK_SECRET": "webhook-secret-direct",
        }
    )
    same, changed = reread_secret_files(settings)
    assert changed == []
    assert same is settings
    token.write_text("mhk_live_rotated_token_0002\n")
    fresh, changed = reread_secret_files(settings)
    assert changed == ["WATCHER_API_TOKEN_FILE"]
    assert fresh.api_token is not None
    assert fresh.api_token.get_secret_value() == "mhk_live_rotated_token_0002"
    assert fresh.control_token is not None
    assert fresh.control_token.get_secret_value() == "control-secret-1"
    assert fresh.webhook_secret is not None
    assert fresh.webhook_secret.get_secret_value() == "webhook-secret-direct"


def test_an_unreadable_secret_file_changes_nothing(tmp_path: Path) -> None:
    """If one file cannot be read (or is empty) the re-read fails whole, naming the variable,
    and no secret is replaced, not even those whose files are fine."""
    token, control = tmp_path / "token", tmp_path / "control"
    token.write_text(TOKEN + "\n")
    control.write_text("control-secret-1\n")
    settings = load_settings(
        {"WATCHER_API_TOKEN_FILE": str(token), "WATCHER_CONTROL_TOKEN_FILE": str(control)}
    )
    token.write_text("mhk_live_rotated_token_0002\n")
    control.write_text("")
    with pytest.raises(ConfigError) as caught:
        reread_secret_files(settings)
    assert str(caught.value) == "WATCHER_CONTROL_TOKEN_FILE: the file it names is empty"
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == TOKEN


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("WATCHER_API_TOKEN", f"{TOKEN}\n", "ends with a line break"),
        ("WATCHER_API_TOKEN", f"{TOKEN}\r\n", "ends with a line break"),
        ("WATCHER_API_TOKEN", f"{TOKEN[:8]}\n{TOKEN[8:]}", "contains a line break"),
        ("WATCHER_API_TOKEN", f"{TOKEN}é", "printable ASCII"),
        ("WATCHER_API_TOKEN", f"{TOKEN[:8]} {TOKEN[8:]}", "printable ASCII"),
        ("WATCHER_API_TOKEN", f" {TOKEN}", "whitespace"),
        ("WATCHER_CONTROL_TOKEN", f"{TOKEN}\n", "ends with a line break"),
        ("WATCHER_CONTROL_TOKEN", f"{TOKEN}\u00a0", "whitespace"),
        ("WATCHER_CONTROL_TOKEN", f"{TOKEN}ü", "printable ASCII"),
        ("WATCHER_WEBHOOK_SECRET", f"{TOKEN}\x1b[2J", "control character"),
        ("WATCHER_NOTIFY_SECRET", f"{TOKEN}\n", "ends with a line break"),
    ],
)
def test_a_malformed_secret_is_refused_at_start_up(
    variable: str, value: str, fragment: str
) -> None:
    """A token with a line break, a control character, surrounding whitespace or (for the two
    sent in HTTP headers) a non-ASCII character is one settings line naming its variable, and
    the secret is not shown."""
    message = _config_error({variable: value})
    assert message.startswith(f"{variable}: "), message
    assert fragment in message
    assert "\n" not in message
    _assert_token_hidden(message)


def test_signing_secrets_may_be_any_unicode() -> None:
    """The webhook and notification secrets are HMAC keys (UTF-8), not header values."""
    settings = load_settings(
        {"WATCHER_WEBHOOK_SECRET": "clé-secrète", "WATCHER_NOTIFY_SECRET": "ключ"}
    )
    assert settings.webhook_secret is not None
    assert settings.webhook_secret.get_secret_value() == "clé-secrète"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (f"{TOKEN}é\n".encode(), "printable ASCII"),
        (f"{TOKEN[:8]}\n{TOKEN[8:]}\n".encode(), "contains a line break"),
        (TOKEN.encode() + b"\xff\n", "not UTF-8"),
    ],
)
def test_a_malformed_secret_file_is_refused_naming_the_file_variable(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    """The secret in a ``_FILE`` is checked like the variable; the error names the ``_FILE``."""
    secret = tmp_path / "token"
    secret.write_bytes(content)
    message = _config_error({"WATCHER_API_TOKEN_FILE": str(secret)})
    assert message.startswith("WATCHER_API_TOKEN_FILE: "), message
    assert fragment in message
    _assert_token_hidden(message)


def test_a_kubernetes_secret_file_loses_its_trailing_newline(tmp_path: Path) -> None:
    """Every ``_FILE`` secret drops the trailing newline a Secret volume or ``echo`` leaves."""
    names = ("API_TOKEN", "CONTROL_TOKEN", "WEBHOOK_SECRET", "NOTIFY_SECRET", "DATABASE_URL")
    environ = {}
    for name in names:
        path = tmp_path / name.lower()
        path.write_text(("sqlite:///x.db" if name == "DATABASE_URL" else TOKEN) + "\r\n", "utf-8")
        environ[f"WATCHER_{name}_FILE"] = str(path)
    settings = load_settings(environ)
    for secret in (settings.api_token, settings.control_token, settings.webhook_secret):
        assert secret is not None
        assert secret.get_secret_value() == TOKEN
    assert settings.database_url == "sqlite:///x.db"


def test_a_secret_file_that_became_malformed_is_refused_on_reread(tmp_path: Path) -> None:
    """A re-read checks the secret as start-up does: a rotated file holding a non-ASCII token
    is refused naming its variable, and the secrets in use stay."""
    secret = tmp_path / "token"
    secret.write_text(f"{TOKEN}\n", "utf-8")
    settings = load_settings({"WATCHER_API_TOKEN_FILE": str(secret)})
    secret.write_text(f"{TOKEN}é\n", "utf-8")
    with pytest.raises(ConfigError, match=r"^WATCHER_API_TOKEN_FILE: .*printable ASCII"):
        reread_secret_files(settings)
    assert settings.require_token().get_secret_value() == TOKEN


def test_a_blank_secret_counts_as_unset() -> None:
    """An empty or blank secret variable turns the feature off instead of signing with ''."""
    assert configured(None) is None
    assert configured(SecretStr("  ")) is None
    assert configured(SecretStr(" s3cret ")) == "s3cret"
