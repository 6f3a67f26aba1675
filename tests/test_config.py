"""Broker settings: YAML + flag precedence, validation, and the CLI's handling of bad config."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from broker.config import (
    BrokerConfig,
    ConfigError,
    add_broker_arguments,
    config_from_args,
    load_yaml,
)
from qmig.cli import main


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_broker_arguments(parser)
    return parser.parse_args(list(argv))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = config_from_args(parse())
    assert cfg == BrokerConfig()
    assert (cfg.host, cfg.tcp_port, cfg.tls_port, cfg.mptcp_port) == ("0.0.0.0", 1883, 8883, 1885)
    assert cfg.allow_anonymous is True
    assert cfg.max_packet_size == 1048576
    assert cfg.sys_interval == 10.0
    assert cfg.redirect is None
    assert not cfg.tls_enabled  # no cert/key: TLS listener simply off


def test_flags_win_over_file_and_file_wins_over_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tcp_port: 2883\nmax-keepalive: 60\nallow_anonymous: false\nsys_interval: 5\n"
        "log_level: debug\n",
    )
    cfg = config_from_args(parse("--config", str(path), "--tcp-port", "3883"))
    assert cfg.tcp_port == 3883  # flag beats file
    assert cfg.max_keepalive == 60  # file beats default (dashes accepted)
    assert cfg.allow_anonymous is False
    assert cfg.sys_interval == 5.0 and isinstance(cfg.sys_interval, float)
    assert cfg.log_level == "DEBUG"
    assert cfg.tls_port == 8883  # untouched default

    cfg = config_from_args(parse("--config", str(path), "--allow-anonymous"))
    assert cfg.allow_anonymous is True  # BooleanOptionalAction overrides a file's false
    cfg = config_from_args(parse("--no-allow-anonymous"))
    assert cfg.allow_anonymous is False


def test_tls_enabled_needs_port_cert_and_key(tmp_path: Path) -> None:
    cfg = config_from_args(parse("--cert", "s.crt", "--key", "s.key"))
    assert cfg.tls_enabled
    cfg = config_from_args(parse("--cert", "s.crt", "--key", "s.key", "--tls-port", "0"))
    assert not cfg.tls_enabled
    with pytest.raises(ConfigError, match="together"):
        config_from_args(parse("--cert", "s.crt"))
    with pytest.raises(ConfigError, match="cafile"):
        config_from_args(parse("--cert", "s.crt", "--key", "k", "--require-certificate"))


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "tcp_port: 1883\nlisten_port: 1\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert "listen_port" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        "tcp_port: '1883'\n",  # string, not int
        "allow_anonymous: 1\n",  # int, not bool
        "tcp_port: true\n",  # bool is not an int here
        "cert: 5\n",
        "sys_interval: fast\n",
        "- a\n- b\n",  # not a mapping
        "tcp_port: [1\n",  # not YAML
    ],
)
def test_bad_yaml_rejected(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_yaml(write(tmp_path, text))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "nope.yaml")
    assert load_yaml(write(tmp_path, "")) == {}


@pytest.mark.parametrize(
    "argv",
    [
        ["--tcp-port", "65536"],
        ["--tls-port", "-1"],
        ["--receive-maximum", "0"],
        ["--receive-maximum", "65536"],
        ["--max-packet-size", "15"],
        ["--max-packet-size", "268435461"],
        ["--max-keepalive", "70000"],
        ["--sys-interval", "-1"],
        ["--redirect", " "],
    ],
)
def test_ranges_validated(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        config_from_args(parse(*argv))


def test_range_limits_accepted() -> None:
    cfg = config_from_args(
        parse(
            "--tcp-port",
            "0",
            "--max-packet-size",
            "268435460",
            "--receive-maximum",
            "65535",
            "--sys-interval",
            "0",
            "--redirect",
            "198.18.2.2:1883",
        )
    )
    assert cfg.tcp_port == 0 and cfg.redirect == "198.18.2.2:1883"


def test_validate_checks_fields_set_in_code() -> None:
    with pytest.raises(ConfigError, match="max_session_expiry"):
        BrokerConfig(max_session_expiry=-1).validate()
    with pytest.raises(ConfigError, match="tcp_port"):
        BrokerConfig(tcp_port="1883").validate()  # type: ignore[arg-type]


def test_cli_config_error_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "bogus: 1\n")
    assert main(["broker", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus" in err


def test_cli_passwd_writes_mosquitto_format(tmp_path: Path) -> None:
    pwfile = tmp_path / "pw"
    assert main(["passwd", str(pwfile), "alice", "-p", "secret"]) == 0
    assert pwfile.read_text().startswith("alice:$7$101$")
    assert pwfile.stat().st_mode & 0o777 == 0o600


def test_cli_certs_prints_three_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out", str(tmp_path / "c"), "--host", "localhost"]) == 0
    lines = capsys.readouterr().out.split()
    assert [Path(p).name for p in lines] == ["ca.crt", "server.crt", "server.key"]


def test_pool_size_is_bounded_by_connection_ids() -> None:
    from quicmig.frames import MAX_POOL_ADDRESSES

    pool = ",".join(f"198.18.9.{i}:14567" for i in range(1, MAX_POOL_ADDRESSES + 2))
    with pytest.raises(ConfigError, match=f"at most {MAX_POOL_ADDRESSES}"):
        BrokerConfig(pool=pool).validate()
    BrokerConfig(pool=pool.rsplit(",", 1)[0]).validate()  # one fewer is fine


def test_metrics_are_off_by_default_and_on_loopback_when_asked(tmp_path: Path) -> None:
    cfg = config_from_args(parse())
    assert (cfg.metrics_port, cfg.metrics_host) == (0, "127.0.0.1")
    cfg = config_from_args(parse("--config", str(write(tmp_path, "metrics-port: 9883\n"))))
    assert (cfg.metrics_port, cfg.metrics_host) == (9883, "127.0.0.1")
    cfg = config_from_args(parse("--metrics-port", "9884", "--metrics-host", "0.0.0.0"))
    assert (cfg.metrics_port, cfg.metrics_host) == (9884, "0.0.0.0")
    with pytest.raises(ConfigError, match=r"metrics_port must be 0\.\.65535"):
        config_from_args(parse("--metrics-port", "70000"))


def test_an_orchestrator_url_needs_http_and_a_strong_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QMIG_ORCHESTRATOR_TOKEN", raising=False)
    token = tmp_path / "orchestrator.token"
    token.write_text("k" * 40 + "\n")
    url = ("--orchestrator-url", "http://127.0.0.1:7891")
    with pytest.raises(ConfigError, match="needs the orchestrator's trigger token"):
        config_from_args(parse(*url))
    with pytest.raises(ConfigError, match="must be an http:// or https:// URL"):
        config_from_args(parse("--orchestrator-url", "ftp://x", "--orchestrator-token-file",
                               str(token)))  # fmt: skip
    with pytest.raises(ConfigError, match="uses fewer than 8 different characters"):
        config_from_args(parse(*url, "--orchestrator-token-file", str(token)))
    with pytest.raises(ConfigError, match="cannot read orchestrator token file"):
        config_from_args(parse(*url, "--orchestrator-token-file", str(tmp_path / "none")))
    token.write_text("0123456789abcdefghijklmnopqrstuvwxyz\n")
    cfg = config_from_args(parse(*url, "--orchestrator-token-file", str(token), "--name", "e1"))
    assert cfg.orchestrator_token == "0123456789abcdefghijklmnopqrstuvwxyz" and cfg.name == "e1"
    assert "0123456789" not in repr(cfg)  # never in a log line
    monkeypatch.setenv("QMIG_ORCHESTRATOR_TOKEN", "zyxwvutsrqponmlkjihgfedcba9876543210")
    assert config_from_args(parse(*url)).orchestrator_token.startswith("zyxw")  # type: ignore[union-attr]
