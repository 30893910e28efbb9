"""Issue 23, item 7: a user's route.yaml can't lower site policy. Each inbox's `allow:` in the
site config caps what a route may ask (destinations, projects, overwrite) and sets floors it
can't go under (deidentify, phi_guard, phi_allow); a route asking more fails, naming the file,
the key, what it asked, the limit and where the site admin changes it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_runner import dicom_destination, wait_for_report, write_config
from tests.fake_xnat import FakeXnat
from tests.security_support import ATTACKER, Lab
from xnat_inbox.commands.explain import check, explain
from xnat_inbox.commands.synthetic import write_session
from xnat_inbox.config import ConfigError, SiteConfig, load_config
from xnat_inbox.intake.claim import ClaimedDrop
from xnat_inbox.reading.scan import scan_drop
from xnat_inbox.routing.route import RouteError, resolve_route, route_study

pytestmark = pytest.mark.security

SCP = {"type": "dicom", "host": "127.0.0.1", "port": 11112}
LABELS = {"subject": "{PatientID}", "session": "{PatientID}_{StudyDate}"}
INSTANCES = 33  # write_session's default study


def site(tmp_path: Path, allow: dict[str, Any] | None = None, route: dict[str, Any] | None = None,
         **settings: Any) -> SiteConfig:
    """A site config with destinations scp and other, written to disk and loaded."""
    inbox: dict[str, Any] = {"path": str(tmp_path / "inbox")}
    if allow is not None:
        inbox["allow"] = allow
    if route is not None:
        inbox["route"] = route
    path = write_config(tmp_path, {"scp": SCP, "other": {**SCP, "port": 11113}}, [inbox],
                        **settings)
    return load_config(path)


def route_file(folder: Path, **keys: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "route.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def drop_in(config: SiteConfig, origin: Path, name: str = "MR_1") -> ClaimedDrop:
    return ClaimedDrop("d1", config.inboxes[0], origin, name, False, datetime.now().astimezone())


def refusal(config: SiteConfig, origin: Path) -> str:
    with pytest.raises(RouteError) as caught:
        resolve_route(drop_in(config, origin), set(config.destinations))
    return str(caught.value)


# --- the site config: defaults, patterns, the inline route ---------------------------------

def test_defaults_keep_todays_routes_but_cap_overwrite_at_append(tmp_path):
    config = site(tmp_path)
    allow = config.inboxes[0].allow
    assert allow.destinations is None and allow.projects == ["*"]
    assert (allow.overwrite, allow.deidentify_floor, allow.phi_guard_floor) == \
        ("append", "off", "off")
    assert config.inboxes[0].config_key == f"{config.source} inboxes[0]"
    inbox = tmp_path / "inbox"
    route_file(inbox, destination="other", project="Anything", phi_guard="off", overwrite="append",
               **LABELS)
    assert resolve_route(drop_in(config, inbox), set(config.destinations)).destination == "other"
    route_file(inbox / "lab", overwrite="delete")
    message = refusal(config, inbox / "lab")
    assert message == (
        f"{inbox / 'lab' / 'route.yaml'}: overwrite: delete is not allowed in this inbox "
        "(allow.overwrite: append); use overwrite: append or less (none < append < delete), or "
        f"ask the site admin to allow it in {config.source} inboxes[0].allow.overwrite")


def test_bad_limits_are_named_at_load(tmp_path):
    with pytest.raises(ConfigError) as caught:
        site(tmp_path, {"projects": ["Lab A/*"], "destinations": ["nowhere"],
                        "phi_guard_floor": "strict"})
    errors = str(caught.value).splitlines()
    path = tmp_path / "config.yaml"
    assert any(e.startswith(f"{path}:") and "inboxes[0].allow.projects: project pattern "
               "'Lab A/*' can never match a project label" in e for e in errors), errors
    assert any("inboxes[0].allow.destinations: unknown destination(s) 'nowhere'; the site "
               "config defines: other, scp" in e for e in errors), errors
    assert any("inboxes[0].allow.phi_guard_floor: Input should be 'off', 'warn' or 'reject'"
               in e for e in errors), errors


def test_the_inline_route_must_respect_its_own_limits(tmp_path):
    with pytest.raises(ConfigError) as caught:
        site(tmp_path, {"destinations": ["scp"], "projects": ["LabA_*"],
                        "phi_guard_floor": "reject"},
             {"destination": "other", "project": "Unsorted", "phi_guard": "warn", **LABELS})
    message = str(caught.value)
    assert "inboxes[0]: " in message
    assert "route.destination: other goes past allow.destinations (scp)" in message
    assert "route.project: Unsorted goes past allow.projects (LabA_*)" in message
    assert "route.phi_guard: warn goes past allow.phi_guard_floor (reject)" in message


def test_a_destination_that_overwrites_by_default_needs_the_inbox_to_allow_it(tmp_path):
    xnat = {"type": "xnat", "url": "https://xnat.example.org", "overwrite": "delete"}
    path = write_config(tmp_path, {"xnat": xnat}, [{"path": str(tmp_path / "inbox")}])
    with pytest.raises(ConfigError, match=r"destinations\.xnat\.overwrite is delete, more than "
                                          r"inboxes\[0\]\.allow\.overwrite \(append"):
        load_config(path)
    allowed = write_config(tmp_path, {"xnat": xnat}, [{"path": str(tmp_path / "inbox"),
                                                        "allow": {"overwrite": "delete"}}])
    assert load_config(allowed).inboxes[0].allow.overwrite == "delete"
    lowered = write_config(tmp_path, {"xnat": xnat}, [{"path": str(tmp_path / "inbox"),
                                                        "route": {"overwrite": "append"}}])
    assert load_config(lowered).inboxes[0].route.overwrite == "append"


def test_floors_read_a_bare_off_as_off(tmp_path):
    config = tmp_path / "config.yaml"
    write_config(tmp_path, {"scp": SCP}, [{"path": str(tmp_path / "inbox")}])
    config.write_text(config.read_text() + "  allow:\n    phi_guard_floor: off\n"
                                           "    deidentify_floor: off\n")
    allow = load_config(config).inboxes[0].allow
    assert (allow.phi_guard_floor, allow.deidentify_floor) == ("off", "off")


def test_a_deidentify_floor_needs_the_site_secret(tmp_path):
    with pytest.raises(ConfigError, match=r"deidentify_floor.*deid_secret_file is missing"):
        site(tmp_path, {"deidentify_floor": "basic"})


# --- route.yaml files asking past the limits ------------------------------------------------

LIMITS = {"destinations": ["scp"], "projects": ["LabA_*", "Shared"], "overwrite": "none",
          "deidentify_floor": "basic", "phi_guard_floor": "warn", "phi_allow": ["InstitutionName"]}
BASE = {"destination": "scp", "project": "LabA_Base", **LABELS}


@pytest.mark.parametrize(("keys", "asked", "limit_key", "limit"), [
    ({"phi_guard": "off"}, "phi_guard: off", "phi_guard_floor", "warn"),
    ({"deidentify": "off"}, "deidentify: off", "deidentify_floor", "basic"),
    ({"destination": "other"}, "destination: other", "destinations", "scp"),
    ({"project": "LabB"}, "project: LabB", "projects", "LabA_* Shared"),
    ({"overwrite": "append"}, "overwrite: append", "overwrite", "none"),
    ({"phi_allow": ["InstitutionName", "PatientBirthDate"]}, "phi_allow: PatientBirthDate",
     "phi_allow", "InstitutionName"),
    ({"phi_allow_patient_name": ".*"}, "phi_allow_patient_name: '.*'", "phi_allow",
     "InstitutionName"),
])
def test_a_route_yaml_asking_past_a_limit_fails_the_drop(tmp_path, keys, asked, limit_key, limit):
    config = site(tmp_path, LIMITS, deid_secret_file=str(tmp_path / "deid.secret"))
    inbox = tmp_path / "inbox"
    route_file(inbox, **BASE)
    attacker = route_file(inbox / "attacker", **keys)
    message = refusal(config, inbox / "attacker")
    assert message.startswith(f"{attacker}: {asked} is not allowed in this inbox "
                              f"(allow.{limit_key}: {limit}); ")
    assert message.endswith(f"or ask the site admin to allow it in {config.source} "
                            f"inboxes[0].allow.{limit_key}")


def test_floors_apply_to_routes_that_leave_the_keys_out(tmp_path):
    config = site(tmp_path, LIMITS, deid_secret_file=str(tmp_path / "deid.secret"))
    inbox = tmp_path / "inbox"
    route_file(inbox, **BASE)
    template = resolve_route(drop_in(config, inbox), set(config.destinations)).template
    assert (template.deidentify, template.phi_guard) == ("basic", "warn")
    route_file(inbox, **BASE, phi_guard="reject")  # more than the floor is fine
    assert resolve_route(drop_in(config, inbox), set(config.destinations)).template.phi_guard \
        == "reject"


def test_a_project_template_is_checked_per_study_once_rendered(tmp_path):
    config = site(tmp_path, {"projects": ["LabA_*"]})
    inbox = tmp_path / "inbox"
    route_file(inbox, destination="scp", project="LabA_Unsorted", **LABELS)
    lab = route_file(inbox / "lab", project="{folder}")
    for name in ("LabA_Ok", "LabB_Stolen"):
        write_session(inbox / "lab" / name)
    routed = {}
    for name in ("LabA_Ok", "LabB_Stolen"):
        drop = drop_in(config, inbox / "lab", name)
        route = resolve_route(drop, set(config.destinations))
        [study] = scan_drop(inbox / "lab" / name).studies.values()
        routed[name] = route_study(study, route, drop)
    assert routed["LabA_Ok"].problems == []
    assert routed["LabB_Stolen"].problems == [
        f"{lab}: project: 'LabB_Stolen' (rendered from '{{folder}}') is not allowed in this "
        "inbox (allow.projects: LabA_*); send to a project matching one of those, or ask the "
        f"site admin to allow it in {config.source} inboxes[0].allow.projects"]


def test_check_and_explain_show_the_limits_and_the_route_that_breaks_them(tmp_path):
    config = site(tmp_path, {"destinations": ["scp"], "phi_guard_floor": "warn"})
    inbox = tmp_path / "inbox"
    route_file(inbox, destination="scp", project="P", **LABELS)
    attacker = route_file(inbox / "attacker", phi_guard="off")
    lines, ok = check(config)
    assert not ok
    assert f"ok   {inbox / 'route.yaml'}" in lines
    assert f"FAIL {attacker}: phi_guard: off is not allowed in this inbox " \
           "(allow.phi_guard_floor: warn); " in "\n".join(lines)
    write_session(inbox / "attacker" / "MR_1")
    shown = list(explain(config, inbox / "attacker" / "MR_1"))
    assert f"Limits ({config.source} inboxes[0].allow): destinations scp; projects *; " \
           "overwrite up to append; deidentify at least off; phi_guard at least warn; " \
           "phi_allow none" in shown
    assert any(line.startswith(f"Route: none usable: {attacker}: phi_guard: off") for line in shown)


def test_an_inbox_without_allow_is_noted_by_check(tmp_path):
    config = site(tmp_path)
    lines, _ = check(config)
    assert f"note {config.source} inboxes[0] has no allow: any route.yaml in this inbox may " \
           "send to any destination and project, and merge into existing XNAT sessions " \
           "(overwrite: append); where other people write route files, limit them with " \
           "allow: (docs/configuration.md, Inboxes)" in lines


# --- end to end: the attacker's route.yaml on a lab share, the real daemon -----------------

def attacker_drop(lab: Lab, folder: str, route: dict[str, Any], name: str) -> Path:
    """The attacker writes a routing folder with `route` and moves a study of theirs into it."""
    target = lab.share / folder
    text = yaml.safe_dump(route)
    lab.attacker_python(f"import os; os.mkdir({str(target)!r}); "
                        f"open({str(target / 'route.yaml')!r}, 'w').write({text!r})")
    staging = lab.root / "staging" / name
    write_session(staging)
    lab.give(staging.parent, ATTACKER, 0o775)  # a directory moved to a new parent needs w
    lab.attacker("mv", str(staging), str(target / name))
    return target / "route.yaml"


def test_attackers_routes_past_the_limits_land_in_failed_and_nothing_is_sent(
        lab, tmp_path, inprocess_scp):
    scp, other = inprocess_scp(), inprocess_scp(aet="OTHER_SCP")
    allow = {"destinations": ["scp"], "projects": ["LabA_*"], "phi_guard_floor": "warn"}
    route = {"destination": "scp", "project": "LabA_Unsorted", **LABELS}
    config = write_config(tmp_path, {"scp": dicom_destination(scp),
                                     "other": dicom_destination(other)},
                          [{"path": str(lab.share), "allow": allow, "route": route}])
    asks = {"guard": ({"phi_guard": "off"}, "MR_GUARD"),
            "elsewhere": ({"destination": "other"}, "MR_ELSEWHERE"),
            "labb": ({"project": "{folder}"}, "LabB_Stolen"),
            "mine": ({"project": "LabA_Mine"}, "MR_MINE")}  # within the limits: sent
    files = {folder: attacker_drop(lab, folder, keys, name)
             for folder, (keys, name) in asks.items()}
    daemon = lab.daemon(config, tmp_path / "daemon.log").start()
    try:
        outcomes = {folder: wait_for_report(lab.share, name, daemon=daemon)
                    for folder, (_, name) in asks.items()}
    finally:
        daemon.stop()

    assert outcomes["mine"][0] == "done", outcomes["mine"][1]["reasons"]
    where = f"{config} inboxes[0].allow"
    expected = {"guard": f"{files['guard']}: phi_guard: off is not allowed in this inbox "
                         f"(allow.phi_guard_floor: warn)",
                "elsewhere": f"{files['elsewhere']}: destination: other is not allowed in this "
                             "inbox (allow.destinations: scp)",
                "labb": f"{files['labb']}: project: 'LabB_Stolen' (rendered from '{{folder}}') is "
                        "not allowed in this inbox (allow.projects: LabA_*)"}
    for folder, text in expected.items():
        outcome, report, _ = outcomes[folder]
        assert outcome == "failed", report["reasons"]
        [reason] = [r for r in report["reasons"] if text in r]
        assert f"ask the site admin to allow it in {where}." in reason
        assert report["limits"]["config"] == where
    # only the drop within the limits reached a receiver
    assert len(scp.received) == INSTANCES
    assert {ds.StudyDescription for ds in scp.received} == {"xnat://LabA_Mine/SUBJ001/"
                                                            "SUBJ001_20260115"}
    assert other.received == []


@pytest.mark.xnat
def test_archive_with_overwrite_delete_is_refused_by_default_and_xnat_gets_nothing(
        lab, tmp_path):
    password = tmp_path / "xnat.secret"
    password.write_text("alice-pw\n")
    password.chmod(0o600)
    with FakeXnat() as xnat:
        destination = {"type": "xnat", "url": xnat.url, "allow_http": True, "username": "alice",
                       "password_file": str(password), "connect_timeout": 3,
                       "retry": {"max_attempts": 2, "initial_backoff": 0.2, "max_backoff": 0.5}}
        # no allow: at all, as in every site config written before limits existed
        config = write_config(tmp_path, {"xnat": destination}, [
            {"path": str(lab.share), "route": {"destination": "xnat", "project": "TEST",
                                               **LABELS}}])
        route = attacker_drop(lab, "overwrite", {"dest": "archive", "overwrite": "delete"},
                              "MR_OVERWRITE")
        daemon = lab.daemon(config, tmp_path / "daemon.log").start()
        try:
            outcome, report, _ = wait_for_report(lab.share, "MR_OVERWRITE", daemon=daemon)
        finally:
            daemon.stop()
        sent = [r for r in xnat.requests() if r["path"].startswith(("/data/services",
                                                                      "/data/prearchive"))]
        archive, prearchive = xnat.archive(), xnat.prearchive()
    assert outcome == "failed"
    assert report["reasons"] == [
        f"{route}: overwrite: delete is not allowed in this inbox (allow.overwrite: append); "
        "use overwrite: append or less (none < append < delete), or ask the site admin to allow "
        f"it in {config} inboxes[0].allow.overwrite"]
    assert sent == [] and archive == [] and prearchive == []
