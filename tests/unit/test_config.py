import pytest

from dicomnode.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "node.yaml"
    p.write_text(text)
    return p


def test_shipped_configuration_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "config" / "node.yaml")
    assert cfg.node.ae_title == "DICOMNODE" and cfg.node.port == 11112
    assert cfg.rules_path.name == "rules.yaml" and cfg.data_dir.name == "data"
    assert cfg.destinations["pacs"].port == 4242
    assert cfg.metrics.enabled and (cfg.metrics.host, cfg.metrics.port) == ("127.0.0.1", 9110)
    assert cfg.audit_path == cfg.data_dir / "audit.log"


def test_metrics_are_off_unless_configured(tmp_path):
    assert not load_config(write(tmp_path, "node: {port: 11112}\n")).metrics.enabled
    assert not load_config(write(tmp_path, "metrics: {port: 0}\n")).metrics.enabled


@pytest.mark.parametrize("text, message", [
    ("node: {port: 99999}\n", "node.port: Input should be less than or equal to 65535"),
    ("node: {ae_tite: X}\n", "node.ae_tite: unknown key"),
    ("node: {ae_title: 'THIS TITLE IS FAR TOO LONG'}\n", "node.ae_title: ae_title must be 1-16 characters"),
    ("callers:\n  - {ae_title: PACS, destination: pcas}\ndestinations:\n  pacs: {ae_title: P, host: h, port: 1}\n",
     "callers[0].destination: 'pcas' is not a configured destination; use one of pacs"),
    ("node: {tls: {enabled: true}}\n", "set tls.cert and tls.key"),
    ("analyzers: {device: tpu}\n", "analyzers.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("metrics: {port: 70000}\n", "metrics.port: Input should be less than or equal to 65535"),
    ("metrics: {port: 11112}\n", "metrics.port: 11112 is also node.port (the DICOM port); choose another"),
    ("metrics: {prot: 9110}\n", "metrics.prot: unknown key"),
    ("metrics: {port: 9110, min_free_mb: -1}\n", "metrics.min_free_mb: Input should be greater than or equal to 0"),
    ("audit: {syslog: {host: h, protocol: tls}}\n", "audit.syslog.protocol: Input should be 'udp' or 'tcp'"),
    ("- just a list\n", "the top level must be a mapping"),
    ("node: [unclosed\n", "not valid YAML"),
])
def test_errors_name_the_key_and_the_fix(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    assert message in str(exc.value)


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError, match="pass --config PATH or set DICOMNODE_CONFIG"):
        load_config(tmp_path / "nope.yaml")
