"""Settings read once from the environment, checked, with secrets never shown."""

from __future__ import annotations

import ipaddress

import pytest

from relay import create_app
from relay.settings import Settings, SettingsError


def test_defaults_need_nothing():
    settings = Settings.from_env({})
    assert settings.useapi_base_url == "https://api.useapi.net/v1"
    assert settings.max_bytes == 50 * 1024 * 1024
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.relay_api_key is None and settings.useapi_token is None


def test_values_are_parsed_and_typed():
    settings = Settings.from_env(
        {
            "RELAY_API_KEY": "k" * 32,
            "RELAY_ALLOWED_NETWORKS": "127.0.0.2/32, 10.1.0.0/16",
            "RELAY_MAX_BYTES": "1000",
            "RELAY_MIN_SECONDS": "2.5",
            "USEAPI_BASE_URL": "http://127.0.0.1:9/v1/",
            "PORT": "5000",
            "RELAY_LOG_LEVEL": "debug",
        }
    )
    assert settings.allowed_networks == (ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("10.1.0.0/16"))
    assert (settings.max_bytes, settings.min_seconds, settings.port) == (1000, 2.5, 5000)
    assert settings.useapi_base_url == "http://127.0.0.1:9/v1"
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"USEAPI_TOKEN": "t" * 20}, "RELAY_API_KEY"),
        ({"RELAY_MAX_BYTES": "lots"}, "RELAY_MAX_BYTES='lots' is invalid: expected a whole number"),
        ({"RELAY_MIN_SECONDS": "soon"}, "RELAY_MIN_SECONDS='soon' is invalid: expected a number"),
        ({"WEB_CONCURRENCY": "abc"}, "WEB_CONCURRENCY='abc' is invalid: expected a whole number"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY must be at least 1"),
        ({"RELAY_THREADS": "0"}, "RELAY_THREADS must be at least 2"),
        ({"RELAY_THREADS": "many"}, "RELAY_THREADS='many' is invalid"),
        ({"DATABASE_URL": "mysql://u:p@db/relay"}, "DATABASE_URL must start with postgres://"),
        ({"RELAY_SPOOL_DIR": "/etc/hostname/spool"}, "RELAY_SPOOL_DIR"),
        ({"RELAY_MAX_BYTES": "0"}, "RELAY_MAX_BYTES must be at least 1"),
        ({"PORT": "70000"}, "PORT must be at most 65535"),
        ({"RELAY_ALLOWED_NETWORKS": "not-a-cidr"}, "RELAY_ALLOWED_NETWORKS"),
        ({"USEAPI_BASE_URL": "ftp://x"}, "USEAPI_BASE_URL"),
        # Without a scheme, status_url and the start page's links became relative paths.
        ({"RELAY_PUBLIC_URL": "relay.example.com"}, "RELAY_PUBLIC_URL must be the address callers use"),
        ({"RELAY_PUBLIC_URL": "https://relay.example.com/?x=1"}, "RELAY_PUBLIC_URL must be"),
        ({"RELAY_MIN_SECONDS": "5", "RELAY_MAX_SECONDS": "2"}, "RELAY_MAX_SECONDS"),
        ({"RELAY_LOG_LEVEL": "chatty"}, "RELAY_LOG_LEVEL"),
        # nan passes every range check: a lease of nan seconds queued clones for ever.
        ({"RELAY_LEASE_SECONDS": "nan"}, "RELAY_LEASE_SECONDS must be a finite number"),
        ({"RELAY_JOB_RETENTION_HOURS": "NaN"}, "RELAY_JOB_RETENTION_HOURS must be a finite number"),
        ({"RELAY_MAX_WAIT_SECONDS": "nan"}, "RELAY_MAX_WAIT_SECONDS must be a finite number"),
        ({"RELAY_CALLBACK_SCHEDULE": "5,inf"}, "RELAY_CALLBACK_SCHEDULE='5,inf' is invalid: each delay"),
        ({"RELAY_CALLBACK_SCHEDULE": "nan"}, "RELAY_CALLBACK_SCHEDULE='nan' is invalid: each delay"),
        ({"RELAY_CALLBACK_SCHEDULE": "soon"}, "expected numbers of seconds separated by commas"),
        # Headers are Latin-1: such a key opened the console and no API call.
        ({"RELAY_API_KEY": "пароль-очень-длинный-1234567890"}, "RELAY_API_KEY must be printable ASCII"),
        ({"RELAY_API_KEY": "tab\tinside-a-long-key-123456"}, "RELAY_API_KEY must be printable ASCII"),
        ({"USEAPI_TOKEN": "user:1-token-pasted\u200b"}, "USEAPI_TOKEN must be printable ASCII"),
    ],
)
def test_bad_values_stop_with_one_clear_line(env, says):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env).check_serving()
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_server_token_without_a_key_is_refused_only_for_serving():
    settings = Settings.from_env({"USEAPI_TOKEN": "t" * 20})  # fine for the CLI: it serves nothing
    with pytest.raises(SettingsError, match="RELAY_API_KEY"):
        settings.check_serving()


@pytest.mark.parametrize(
    ("env", "workers"),
    [({}, 1), ({"DATABASE_URL": "postgres://u@h/d"}, 2), ({"WEB_CONCURRENCY": "5"}, 5)],
)
def test_gunicorn_processes_follow_web_concurrency_or_the_database(env, workers):
    assert Settings.from_env(env).gunicorn_workers() == workers


def test_secrets_never_appear_in_repr_or_description():
    key, token = "relay-key-abcdefghijklmnop", "useapi-token-qrstuvwxyz123"
    settings = Settings.from_env({"RELAY_API_KEY": key, "USEAPI_TOKEN": token})
    shown = repr(settings) + str(settings.describe())
    assert key not in shown and token not in shown
    assert settings.describe()["USEAPI_TOKEN"] == "****z123"


def test_a_malformed_secret_is_not_echoed_in_the_error():
    # A secret never fails to parse, but the error path masks any secret value regardless.
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"USEAPI_TOKEN": "tok-secret-value-1234"}).check_serving()
    assert "tok-secret-value-1234" not in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"DATABASE_URL": "mysql://relay:db-pass-5678@db.example/relay"})
    assert "db-pass-5678" not in str(caught.value)


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.max_bytes = 1  # type: ignore[misc]


def test_the_app_refuses_an_open_relay_holding_a_server_token():
    with pytest.raises(SettingsError):
        create_app(Settings(useapi_token="server-token-0000000000"))
