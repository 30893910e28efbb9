"""Step between route and send: de-identify the outgoing copy and guard against PHI.

`basic` applies DICOM PS3.15 Table E.1-1 (Basic Application Confidentiality Profile) as shipped
by the dicom-anonymizer package (KitwareMedical), with our own actions: its UID replacement is
random per process, but XNAT's merge needs the same new StudyInstanceUID for every series and
every later drop of a study, so UIDs are remapped with a keyed hash of the site secret.
Only the outgoing copy is changed, never the original file, and never PixelData; what follows
the pixel data (private groups, signatures, padding) goes through the profile like the header.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from structlog.stdlib import BoundLogger

from ..intake.claim import ClaimedDrop
from ..reading.scan import Instance
from ..reading.trailer import TrailerError, read_without_pixels
from ..secrets import SecretError, read_secret
from .route import RoutedStudy, label_study

#: the edition of Table E.1-1 dicom-anonymizer ships that we apply
TABLE_EDITION = "dicomfields_2026c"
#: the table's categories and the one action we take for each (the most removing one that
#: keeps the object valid: X where X is allowed, Z before D, so nothing original survives)
CATEGORY_ACTION = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U",
                   "Z_D_TAGS": "Z", "X_Z_TAGS": "X", "X_D_TAGS": "X", "X_Z_D_TAGS": "X",
                   "X_Z_U_STAR_TAGS": "X"}
ACTION_NAMES = {"X": "removed", "Z": "emptied", "D": "replaced by a dummy",
                "U": "UID remapped", "P": "removed (private)", "K": "pseudonymised"}
#: VR -> dummy value for action D (PS3.15: a non-zero length value consistent with the VR)
DUMMIES: dict[str, object] = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000",
                              "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0",
                              "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0}
TEXT_DUMMY = "ANONYMIZED"
BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
#: what the PHI guard looks at besides PatientName, BurnedInAnnotation and private tags
GUARDED = ("PatientBirthDate", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers",
           "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthName",
           "PatientMotherBirthName", "MedicalRecordLocator", "MilitaryRank", "EthnicGroup",
           "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
           "ReferringPhysicianName", "ReferringPhysicianAddress", "PhysiciansOfRecord",
           "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
           "RequestingPhysician")

Transform = Callable[[Dataset], None]


@lru_cache(maxsize=1)
def profile_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """Table E.1-1 as {tag: action} plus masked entries for repeating groups (50xx, 60xx)."""
    database = dicom_anonymization_database_selector(TABLE_EDITION)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in CATEGORY_ACTION.items():
        for entry in database[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((*entry, action))  # type: ignore[arg-type]
    return exact, masked


def action_for(tag: BaseTag) -> str | None:
    exact, masked = profile_table()
    if tag in exact:
        return exact[tag]
    for group, element, group_mask, element_mask, action in masked:
        if tag.group & group_mask == group and tag.element & element_mask == element:
            return action
    return None


def remap_uid(secret: bytes, uid: str) -> str:
    """A new UID from HMAC-SHA256(secret, uid): the same across drops and restarts."""
    digest = hmac.new(secret, b"uid:" + uid.strip().encode(), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"  # at most 44 characters


def pseudonym(secret: bytes, patient_id: str) -> str:
    digest = hmac.new(secret, b"patient:" + patient_id.strip().encode(), hashlib.sha256)
    return "ANON" + digest.hexdigest()[:12].upper()


@dataclass(frozen=True)
class Deidentifier:
    """The `basic` transform: call it on a Dataset to de-identify it in place."""

    secret: bytes

    def uid(self, uid: str) -> str:
        return remap_uid(self.secret, uid)

    def __call__(self, ds: Dataset) -> None:
        patient_id = str(ds.get("PatientID", "") or "")
        self._walk(ds)
        if patient_id:  # Z allows a dummy: a stable pseudonym keeps XNAT's subject together
            ds.PatientID = ds.PatientName = pseudonym(self.secret, patient_id)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = f"xnat-inbox basic (PS3.15 E.1-1, {TABLE_EDITION})"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    def _walk(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            if tag.is_private:
                del ds[tag]
                continue
            action = action_for(tag)
            element = ds[tag]
            if action is not None:
                self._apply(ds, element, action)
            elif element.VR == "SQ":
                for item in element.value or []:
                    self._walk(item)

    def _apply(self, ds: Dataset, element: DataElement, action: str) -> None:
        if action == "X":
            del ds[element.tag]
        elif action == "U" and element.VR == "UI" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            remapped = [self.uid(str(value)) for value in values]
            element.value = remapped if element.VM > 1 else remapped[0]
        elif action == "D" and element.VR not in BINARY_VRS | {"SQ", "UI"}:
            element.value = DUMMIES.get(element.VR, TEXT_DUMMY)
        else:  # Z, and D where no dummy fits (sequences, binary): empty
            element.value = Sequence([]) if element.VR == "SQ" else (
                b"" if element.VR in BINARY_VRS else None)


# --- the step: called by the pipeline for each routed study ---------------------------------

def prepare(routed: RoutedStudy, drop: ClaimedDrop, secret_file: str | None,
            record: Callable[[list[tuple[str, str, str]]], None] | None,
            log: BoundLogger) -> None:
    """Attach the route's transform to `routed`, relabel if asked, record the UID map, and run
    the PHI guard; a problem (no secret, PHI under `reject`) keeps the study from being sent."""
    template = routed.template
    if template.deidentify not in (None, "off"):
        try:
            transform = Deidentifier(read_secret(secret_file).reveal().strip().encode()
                                     if secret_file else b"")
        except (SecretError, OSError) as exc:
            routed.problems.append(f"deidentify: cannot read deid_secret_file: {exc}")
            return
        if not transform.secret:
            routed.problems.append("deidentify: basic needs a site secret: set "
                                   "deid_secret_file in the site config")
            return
        routed.transform, routed.uid_map = transform, transform.uid
        if template.label_source == "deidentified":
            routed.problems, routed.labels, routed.routing_value = list(routed.study.problems),\
                None, ""
            first = routed.study.instances[0]
            try:
                label_study(routed, outgoing_header(first, transform), drop)
            except Exception as exc:  # hostile bytes make pydicom raise many kinds of error
                routed.problems.append(f"deidentify: cannot read {first.rel} for its "
                                       f"de-identified labels: {_why(exc)}")
                return
        if record is not None:
            record(mapping(routed, transform))
    if template.phi_guard not in (None, "off") and routed.included and not routed.problems:
        guard(routed, log)


def outgoing_header(instance: Instance, transform: Transform | None) -> Dataset:
    """Every element of the instance's outgoing copy but the pixel data (what follows it too);
    values too long for any attribute the guard or a label reads are not read."""
    with instance.open() as stream:
        header, _ = read_without_pixels(stream)
        if transform is not None:
            transform(header)
        return header


def mapping(routed: RoutedStudy, transform: Deidentifier) -> list[tuple[str, str, str]]:
    """(kind, original, new) rows for `xnat-inbox lookup`."""
    study = routed.study
    rows = [("StudyInstanceUID", study.uid, transform.uid(study.uid))]
    rows += [("SeriesInstanceUID", uid, transform.uid(uid)) for uid in study.series]
    rows += [("SOPInstanceUID", i.sop_instance_uid, transform.uid(i.sop_instance_uid))
             for i in study.instances]
    rows += [("PatientID", pid, pseudonym(transform.secret, pid)) for pid in study.patient_ids
             if pid]
    return rows


def guard(routed: RoutedStudy, log: BoundLogger) -> None:
    """Inspect every element but the pixel data of every instance sent, as it will go out."""
    template = routed.template
    findings: list[str] = []
    unread: list[str] = []
    for instance in (instance for series in routed.included for instance in series.instances):
        try:
            header = outgoing_header(instance, routed.transform)
        except Exception as exc:  # hostile bytes make pydicom raise many kinds of error
            unread.append(f"{instance.rel} ({_why(exc)})")
            continue
        findings += [name for name in phi_findings(header, _policy(routed, header))
                     if name not in findings]
    routed.phi_findings = findings
    if unread:
        _guard_unread(routed, unread, log)
    if not findings:
        return
    if template.phi_guard == "reject":
        routed.problems.append(
            f"PHI guard: the outgoing header still carries {', '.join(findings)}; not sent. "
            "De-identify the files (or set deidentify: basic), or allow them with phi_allow")
    else:
        log.warning("phi guard: outgoing header carries PHI", stage="route",
                    study=routed.study.uid, attributes=findings)


def _policy(routed: RoutedStudy, header: Dataset) -> GuardPolicy:
    names = [routed.labels.subject] if routed.labels else []
    if routed.transform is not None:
        names.append(str(header.get("PatientID", "")))  # our pseudonym
    return GuardPolicy(frozenset(routed.template.phi_allow or ()),
                       routed.template.phi_allow_patient_name, tuple(names))


def _why(exc: Exception) -> str:
    """Why a file can't be read, without its values (pydicom's messages may quote them)."""
    if isinstance(exc, TrailerError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


def _guard_unread(routed: RoutedStudy, unread: list[str], log: BoundLogger) -> None:
    """Files the guard could not read whole: never sent unseen under `reject`."""
    listed = ", ".join(unread[:5]) + (f" and {len(unread) - 5} more" if len(unread) > 5 else "")
    if routed.template.phi_guard == "reject":
        routed.problems.append(f"PHI guard: cannot inspect {len(unread)} file(s): {listed}; "
                               "not sent. Fix or remove them, or set phi_guard: warn")
    else:
        log.warning("phi guard: cannot inspect some files", stage="route",
                    study=routed.study.uid, files=len(unread), first=unread[0])


# --- PHI guard ------------------------------------------------------------------------------

@dataclass(frozen=True)
class GuardPolicy:
    allow: frozenset[str] = frozenset()  # keywords the route allows to carry values
    patient_name: re.Pattern[str] | None = None  # an allowed PatientName pattern
    allowed_names: tuple[str, ...] = ()  # e.g. the subject label, the pseudonym


def phi_findings(ds: Dataset, policy: GuardPolicy) -> list[str]:
    """Names (never values) of attributes in this outgoing header that still look like PHI."""
    found = [keyword for keyword in GUARDED
             if keyword not in policy.allow and _has_value(ds, keyword)]
    name = str(ds.get("PatientName", "") or "").strip()
    if name and "PatientName" not in policy.allow and not _allowed_name(name, policy):
        found.insert(0, "PatientName")
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        found.append("BurnedInAnnotation")
    # the tags alone: iterating a Dataset yields its elements, each value decoded on the way
    if any(tag.is_private for tag in ds.keys()) and "private" not in policy.allow:  # noqa: SIM118
        found.append("private tags")
    return found


def _allowed_name(name: str, policy: GuardPolicy) -> bool:
    if name in policy.allowed_names:
        return True
    return bool(policy.patient_name and policy.patient_name.fullmatch(name))


def _has_value(ds: Dataset, keyword: str) -> bool:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value still carries bytes: count it
        return True
    if value is None:
        return False
    return bool(len(value)) if isinstance(value, Sequence) else bool(str(value).strip())


# --- explain --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    keyword: str
    action: str
    before: str
    after: str


def changes(before: Dataset, after: Dataset) -> list[Change]:
    """What the transform changed in one header, top level, for `explain`."""
    listed: list[Change] = []
    for element in before:
        tag, name = element.tag, element.keyword or str(element.tag)
        if tag.is_private:
            listed.append(Change(name, "P", _text(element), ""))
        elif tag not in after:
            listed.append(Change(name, "X", _text(element), ""))
        elif after[tag].value != element.value:
            action = action_for(tag) or "K"
            if name in ("PatientID", "PatientName"):
                action = "K"
            listed.append(Change(name, action, _text(element), _text(after[tag])))
    return listed


def _text(element: DataElement) -> str:
    if element.VR == "SQ":
        return f"<{len(element.value or [])} item(s)>"
    if element.VR in BINARY_VRS:
        return f"<{len(element.value or b'')} bytes>"
    return "" if element.value is None else str(element.value)


def describe(items: Iterable[Change], show_values: bool) -> list[str]:
    lines = []
    for change in items:
        line = f"{change.keyword}: {ACTION_NAMES[change.action]}"
        if show_values:
            line += f" ({change.before!r} -> {change.after!r})"
        lines.append(line)
    return lines
