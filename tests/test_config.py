"""Site config and route templates: validation and where errors point."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon_runner import REPO
from xnat_inbox.config import ConfigError, RouteTemplate, load_config, load_route
from xnat_inbox.templates import Template, TemplateError, clean_label, label_problem

GOOD = """\
state_dir: {tmp}/state
destinations:
  scp:
    type: dicom
    host: 127.0.0.1
    port: 11112
inboxes:
  - path: {tmp}/inbox
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("{tmp}", str(tmp_path)))
    return path


def errors_of(path: Path, loader=load_config, *args) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        loader(path, *args)
    return str(caught.value).splitlines()


def test_good_config_has_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    inbox = config.inboxes[0]
    assert config.settle_seconds == 30 and config.log_phi is False
    assert inbox.poll == "auto" and inbox.done == tmp_path / "inbox" / "done"
    assert inbox.failed == tmp_path / "inbox" / "failed"
    dest = config.destinations["scp"]
    assert (dest.called_ae, dest.calling_ae) == ("ANY-SCP", "XNAT_INBOX")


def test_each_error_names_file_line_key_and_expected_form(tmp_path):
    text = GOOD.replace("port: 11112", "port: eleven\n    calld_ae: X") + (
        "    poll: sometimes\n    route:\n      destination: nowhere\n"
        "      subject: '{PatientId}'\n")
    path = write(tmp_path, text)
    errors = errors_of(path)
    assert f"{path}:6: destinations.scp.port: Input should be a valid integer" in errors[0]
    assert errors[1] == f"{path}:7: destinations.scp.calld_ae: unknown key; check its spelling " \
                        "against the example config"
    assert errors[2].startswith(f"{path}:10: inboxes[0].poll: ")
    assert errors[2].endswith("expected auto, true or false, got 'sometimes'")
    assert errors[3] == f"{path}:12: inboxes[0].route.destination: unknown destination " \
                        "'nowhere'; the site config defines: scp"
    assert errors[4].startswith(f"{path}:13: inboxes[0].route.subject: template '{{PatientId}}'")
    assert "not a DICOM keyword" in errors[4]


def test_missing_keys_and_bad_yaml_are_named(tmp_path):
    path = write(tmp_path, "state_dir: /x\ninboxes: []\n")
    errors = errors_of(path)
    assert f"{path}:1: destinations: required key is missing" in errors
    assert any(e.startswith(f"{path}:2: inboxes: ") for e in errors)
    broken = write(tmp_path, "state_dir: /x\ndestinations: {\n  scp: [\n", "broken.yaml")
    [error] = errors_of(broken)
    assert error.startswith(f"{broken}:4: invalid YAML")
    missing = tmp_path / "absent.yaml"
    assert errors_of(missing) == [f"{missing}: cannot read the file (No such file or directory)."]


def test_nested_inboxes_are_refused(tmp_path):
    text = GOOD + "  - path: {tmp}/inbox/sub\n"
    [error] = errors_of(write(tmp_path, text))
    assert "inboxes[1].path" in error and "lies inside inboxes[0].path" in error


def test_example_configs_in_etc_are_valid():
    config = load_config(REPO / "etc/xnat-inbox/config.yaml")
    names = set(config.destinations)
    assert all(d.host.endswith(".example.org") for d in config.destinations.values())
    for route in [REPO / "etc/xnat-inbox/route.yaml", *(REPO / "etc/xnat-inbox/routes").glob("*")]:
        load_route(route, names)


def test_route_children_override_only_what_they_name(tmp_path):
    parent = load_route(write(tmp_path, "destination: scp\nproject: P\nsubject: '{PatientID}'\n"
                              "session: '{folder}'\nclean_labels: true\n", "a.yaml"), {"scp"})
    child = load_route(write(tmp_path, "project: Q\n", "b.yaml"), {"scp"})
    merged = child.merged_over(parent)
    assert merged.project.text == "Q" and merged.subject.text == "{PatientID}"
    assert merged.destination == "scp" and merged.clean_labels is True
    assert RouteTemplate().merged_over(parent) == parent


def test_route_with_unknown_key_bad_regex_and_unknown_destination(tmp_path):
    path = write(tmp_path, "destination: elsewhere\nproject: P\nsubjct: S\nseries:\n  exclude:\n"
                           "    SeriesDescription: '(unclosed'\n    NotAKeyword: x\n", "route.yaml")
    errors = errors_of(path, load_route, {"scp"})
    assert errors[0] == f"{path}:1: destination: unknown destination 'elsewhere'; the site " \
                        "config defines: scp"
    assert errors[1] == f"{path}:3: subjct: unknown key; check its spelling against the " \
                        "example config"
    assert errors[2].startswith(f"{path}:5: series.exclude: ")


@pytest.mark.parametrize("text", ["{x.__class__}", "{PatientID!r}", "{PatientID:>10}", "{}",
                                  "{0}", "{PatientID[0]}", "{Nonsense}", "{unclosed"])
def test_templates_refuse_anything_but_keywords(text):
    with pytest.raises(TemplateError):
        Template.parse(text)


def test_templates_substitute_values_only():
    template = Template.parse("{PatientID}_{StudyDate}-{folder}")
    assert template.fields == {"PatientID", "StudyDate", "folder"}
    assert template.render({"PatientID": "{StudyDate}", "StudyDate": "2026"}) == "{StudyDate}_2026-"


def test_label_rule():
    assert label_problem("SUBJ-01_a") is None
    assert label_problem("") == "renders empty"
    assert "'/'" in label_problem("../x") and "'.'" in label_problem("../x")
    assert "65 characters" in label_problem("x" * 65)
    assert clean_label("Smith^John J.") == "Smith_John_J_"
