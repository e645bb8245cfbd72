#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/corpus/TARGET/NAME, from synthetic test values
(no patient data). Run from anywhere: `python3 fuzz/seeds/make_seeds.py`. The files are
committed; rerun only when the formats change."""

import json
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
SEEDS = {}


def seed(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    SEEDS.setdefault(target, {})[name] = data


# --- DICOM -------------------------------------------------------------------------------

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.392.200036.9999.1.1.1"
STUDY = "1.2.392.200036.9999.1.1"


def pad(value, fill=b" "):
    if isinstance(value, str):
        value = value.encode()
    return value + fill if len(value) % 2 else value


def implicit(group, elem, value):
    return struct.pack("<HHI", group, elem, len(value)) + value


LONG_VRS = {b"OB", b"OW", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"}


def explicit(group, elem, vr, value, undefined=False):
    length = 0xFFFFFFFF if undefined else len(value)
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr, 0, length) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def command(fields):
    """A command set: (element, value bytes) in order, with its group length."""
    body = b"".join(implicit(0x0000, e, v) for e, v in fields)
    return implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def us(v):
    return struct.pack("<H", v)


ECHO_RQ = command([(0x0002, pad("1.2.840.10008.1.1", b"\0")), (0x0100, us(0x0030)),
                   (0x0110, us(1)), (0x0800, us(0x0101))])
STORE_RQ = command([(0x0002, pad(CT_IMAGE, b"\0")), (0x0100, us(0x0001)), (0x0110, us(7)),
                    (0x0700, us(0)), (0x0800, us(0x0000)), (0x1000, pad(INSTANCE, b"\0"))])
STORE_RSP = command([(0x0002, pad(CT_IMAGE, b"\0")), (0x0100, us(0x8001)), (0x0120, us(7)),
                     (0x0800, us(0x0101)), (0x0900, us(0x0000)),
                     (0x1000, pad(INSTANCE, b"\0"))])
FIND_RQ = command([(0x0002, pad("1.2.840.10008.5.1.4.1.2.2.1", b"\0")), (0x0100, us(0x0020)),
                   (0x0110, us(3)), (0x0700, us(0)), (0x0800, us(0x0000))])
MOVE_RSP = command([(0x0002, pad("1.2.840.10008.5.1.4.1.2.2.2", b"\0")),
                    (0x0100, us(0x8021)), (0x0120, us(4)), (0x0800, us(0x0101)),
                    (0x0900, us(0xFF00)), (0x1020, us(2)), (0x1021, us(1)), (0x1022, us(0)),
                    (0x1023, us(0))])
for name, c in [("c-echo-rq", ECHO_RQ), ("c-store-rq", STORE_RQ), ("c-store-rsp", STORE_RSP),
                ("c-find-rq", FIND_RQ), ("c-move-rsp", MOVE_RSP)]:
    seed("dimse_command", name, c)

# Synthetic patient: ID 12345, name テスト^タロウ in ISO 2022 IR 87 (the escape sequences kept).
NAME = b"\x1b$B%F%9%H\x1b(B^\x1b$B%?%m%&\x1b(B"


def data_set(enc, other_ids=True, undefined_sq=False, group_length=False):
    if enc == "explicit":
        def el(g, e, vr, v, undefined=False):
            return explicit(g, e, vr, v, undefined)
    else:
        def el(g, e, vr, v, undefined=False):
            if undefined:
                return struct.pack("<HHI", g, e, 0xFFFFFFFF) + v
            return implicit(g, e, v)
    out = el(0x0008, 0x0005, b"CS", pad("\\ISO 2022 IR 87"))
    out += el(0x0008, 0x0016, b"UI", pad(CT_IMAGE, b"\0"))
    out += el(0x0008, 0x0018, b"UI", pad(INSTANCE, b"\0"))
    if group_length:
        out += el(0x0010, 0x0000, b"UL", struct.pack("<I", 0))
    out += el(0x0010, 0x0010, b"PN", pad(NAME))
    out += el(0x0010, 0x0020, b"LO", pad("12345"))
    if other_ids:
        item_body = el(0x0010, 0x0020, b"LO", pad("OLD-1")) + el(0x0010, 0x0021, b"LO", pad("X"))
        if undefined_sq:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item_body
            item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
            items = item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            out += el(0x0010, 0x1002, b"SQ", items, undefined=True)
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(item_body)) + item_body
            out += el(0x0010, 0x1002, b"SQ", item)
    out += el(0x0020, 0x000D, b"UI", pad(STUDY, b"\0"))
    out += el(0x7FE0, 0x0010, b"OB" if enc == "explicit" else b"OW", bytes(range(16)))
    return out


DATA_SETS = {
    "explicit": data_set("explicit"),
    "explicit-undefined-sq": data_set("explicit", undefined_sq=True),
    "explicit-no-other-ids": data_set("explicit", other_ids=False, group_length=True),
    "implicit": data_set("implicit"),
    "implicit-undefined-sq": data_set("implicit", undefined_sq=True),
}
for name, ds in DATA_SETS.items():
    flag = 1 if name.startswith("explicit") else 0
    seed("dicom_header", name, bytes([flag | 2]) + ds)
    seed("dicom_translate", name, bytes([flag]) + ds)


def pdata(pc_id, is_command, is_last, data):
    mch = (1 if is_command else 0) | (2 if is_last else 0)
    pdv = struct.pack(">IBB", len(data) + 2, pc_id, mch) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


RELEASE_RQ = struct.pack(">BBI", 0x05, 0, 4) + bytes(4)
ds = DATA_SETS["explicit"]
seed("pdata_reassembly", "c-echo", b"\x01" + pdata(1, True, True, ECHO_RQ) + RELEASE_RQ)
seed("pdata_reassembly", "c-store-fragmented", b"\x01"
     + pdata(1, True, False, STORE_RQ[:20]) + pdata(1, True, True, STORE_RQ[20:])
     + pdata(1, False, False, ds[:40]) + pdata(1, False, True, ds[40:]) + RELEASE_RQ)
seed("pdata_reassembly", "c-store-implicit", b"\x00" + pdata(3, True, True, STORE_RQ)
     + pdata(3, False, True, DATA_SETS["implicit"]))

# --- SS-MIX2 -----------------------------------------------------------------------------

ADT = "\r".join([
    "MSH|^~\\&|HIS123|SEND|GW|RCV|20250401093000.123||ADT^A08^ADT_A01|20250401000001|P|2.5||||||~ISO IR87||ISO 2022-1994",
    "EVN||20250401093000|||||",
    "PID|0001||0000012345^^^^PI||テスト^タロウ^^^^^L^I~テスト^タロウ^^^^^L^P||19800101|M|||^^^^1000001^^^^13101",
    "PV1|0001|O|01^^^^^C||||||||||||||||||||||||||||||||||||||||||||||||",
    "",
])
OMP = "\r".join([
    "MSH|^~\\&|HIS123|SEND|GW|RCV|20250401100000||RDE^O11^RDE_O11|20250401000002|P|2.5||||||~ISO IR87||ISO 2022-1994",
    "PID|0001||0000012345^^^^PI||テスト^ハナコ^^^^^L^I||19900202|F",
    "ORC|NW|000000000012345|||||||20250401100000",
    "RXE||103835401^ロキソプロフェン錠６０ｍｇ^HOT|1||TAB^錠^MR9P|",
    "",
])
for name, text in [("adt-a08", ADT), ("rde-o11", OMP)]:
    seed("hl7_message", name, text.encode("iso2022_jp_ext"))
    seed("iso2022jp_decode", name, text.encode("iso2022_jp_ext"))
seed("hl7_message", "cancel-escapes", ("MSH|^~\\&|A|B|C|D|20250401||ADT^A23^ADT_A21|1|P|2.5\r"
                                       "PID|||0000012345^^^^PI||\\T\\x\\S\\y\\E\\^^^^^^L\r").encode())
seed("iso2022jp_decode", "cp932", "PID|||1||テスト^ジロウ\r".encode("cp932"))
seed("iso2022jp_decode", "utf8", "PID|||1||テスト^サブロウ\r".encode())
seed("iso2022jp_decode", "halfwidth-kana", b"PID|||1||\x1b(I4=D\x1b(B^\x1b$B%?%m%&\x1b(B\r")

NAMES = [
    "0000012345_20250401_ADT-00_000000000000000_20250401093000123_01_1",
    "0000012345_-_OMP-01_000000000012345_20250401100000000_-_1",
    "0000012345_20250401_OMP-11_000000000012345_20250401100000000_01_0",
    "OMG-01/0000012345_20250401_OMG-01_2025040100300_20250401224447000_01_1",
    "000/001/0000012345/20250401/ADT-00/0000012345_20250401_ADT-00_000000000000000_20250401093000123_01_1",
    "20250401093000.1234+0900",
]
for i, n in enumerate(NAMES):
    seed("ssmix2_name", f"name-{i}", n)

TR = ("#SSMIX,2.00,9999999999,0000012345,20250401,OMP-01,000000000012345,INS,-,20250401235959567\r"
      + OMP.replace("\r", "\r", 0)
      + "#SSMIX,2.00,9999999999,0000012345,20250401,OMP-01,000000000012345,DEL,-,20250402000000000\r")
seed("ssmix2_transaction", "insert-delete", TR.encode("iso2022_jp_ext"))
seed("ssmix2_transaction", "short-header", "#SSMIX,2.00,99,0000012345\r")

# --- FHIR --------------------------------------------------------------------------------

CONSENT = {
    "resourceType": "Consent",
    "id": "srv-1",
    "meta": {"versionId": "3", "lastUpdated": "2026-11-22T04:05:00.123456Z"},
    "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                          "code": "patient-privacy"}]},
    "patient": {"reference": "Patient/p1"},
    "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                               "code": "OPTIN"}]},
    "provision": {
        "type": "permit",
        "period": {"start": "2026-11-01"},
        "code": [{"coding": [{"system": "urn:tsunagi:data-category", "code": "images"},
                             {"system": "urn:tsunagi:data-category", "code": "lab-results"}]}],
    },
}
seed("fhir_resource", "consent-permit", json.dumps(CONSENT))
deny = json.loads(json.dumps(CONSENT))
deny["provision"]["provision"] = [{
    "type": "deny",
    "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
               "reference": {"identifier": {"system": "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no", "value": "2732345678"}}}],
}]
seed("fhir_resource", "consent-nested-deny", json.dumps(deny))
optout = json.loads(json.dumps(CONSENT))
optout["status"] = "inactive"
optout["policyRule"]["coding"][0]["code"] = "OPTOUT"
seed("fhir_resource", "consent-optout", json.dumps(optout))
seed("fhir_resource", "patient", json.dumps({
    "resourceType": "Patient",
    "identifier": [
        {"use": "usual", "system": "urn:oid:1.2.392.100495.20.3.51.11310000019", "value": "0000012345"},
        {"system": "urn:oid:1.2.392.100495.20.3.51.12732345678", "value": "777"},
        {"system": "urn:oid:1.2.3.4.5", "value": "NET-0001"},
    ],
    "name": [{"use": "official", "text": "テスト タロウ", "family": "テスト", "given": ["タロウ"]}],
    "gender": "male",
    "birthDate": "1980-01-01",
}))
seed("fhir_resource", "audit-checkpoint", json.dumps({
    "resourceType": "AuditEvent",
    "id": "tsunagi-audit-1310000019",
    "entity": [{"what": {"identifier": {"system": "urn:tsunagi:audit-trail", "value": "1310000019"}},
                "detail": [{"type": "head-seq", "valueString": "41"},
                           {"type": "head-mac", "valueString": "ab" * 32}]}],
}))

# --- Config and the line protocols -------------------------------------------------------

for example in sorted((ROOT / "appliance" / "examples").glob("*.toml")):
    seed("config_toml", example.stem, example.read_bytes())

for name, line in [
    ("decide", {"decide": {"patient": "0000012345", "recipient": "hub", "category": "images"}}),
    ("decide-facility", {"decide": {"patient": "0000012345", "recipient": "2732345678",
                                    "category": "lab-results", "at": "2026-11-01T00:00:00+09:00"}}),
    ("changes", {"changes": {"since": 41}}),
    ("network-id-of", {"network-id-of": {"patient": "0000012345"}}),
    ("released", {"released": {"patient": "0000012345", "recipient": "hub", "category": "images",
                               "kind": "sent", "objects": [{"dicom-instance": INSTANCE},
                               {"ssmix2-file": {"sha256": "0" * 64, "data_type": "OMP-01"}}],
                               "decision": 41}}),
    ("answer-permit", {"decided": {"decision": "permit", "audit": 41}}),
    ("answer-deny", {"decided": {"decision": "deny", "reason": "withdrawn", "audit": 42}}),
    ("answer-changes", {"changes": {"seq": 3, "patients": ["0000012345"], "more": False, "fresh": True}}),
    ("answer-identity", {"identity": {"known": True, "network_id": "NET-0001"}}),
    ("answer-error", {"error": "busy"}),
]:
    seed("consent_protocol", name, json.dumps(line) + "\n")

for name, line in [
    ("ready", {"type": "ready"}),
    ("status", {"type": "status", "health": "degraded", "summary": "3 queued, 1 held",
                "metrics": {"queued": 3, "sent_total": 120}}),
    ("error", {"type": "error", "message": "cannot open the spool: permission denied"}),
]:
    seed("child_report", name, json.dumps(line) + "\n")

for name, line in [
    ("status-request", {"request": "status"}),
    ("refused", {"ok": False, "error": "unknown request"}),
    ("status-response", {"ok": True, "status": {
        "supervisor": {"pid": 1, "version": "0.0.0", "privileged": True, "ready": True,
                       "uptime_secs": 60, "config": "/etc/tsunagi/tsunagi.toml"},
        "services": [{"name": "dicom", "state": "ready", "health": "ok", "pid": 42,
                      "restarts": 0, "last_error": None, "uptime_secs": 59,
                      "summary": "3 queued", "user": "tsunagi-dicom",
                      "metrics": {"queued": 3}}]}}),
]:
    seed("control_request", name, json.dumps(line) + "\n")

# --- Storage commitment reports (N-EVENT-REPORT data sets) ---------------------------------

TRANSACTION = "2.25.123456789012345678901234567890"


def item(elements, undefined):
    body = b"".join(elements)
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def sequence(group, elem, items, is_explicit, undefined):
    body = b"".join(items)
    if undefined:
        body += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    if is_explicit:
        return explicit(group, elem, b"SQ", body, undefined)
    length = 0xFFFFFFFF if undefined else len(body)
    return struct.pack("<HHI", group, elem, length) + body


def commitment(is_explicit, undefined, failed):
    def el(group, elem, vr, value):
        return explicit(group, elem, vr, value) if is_explicit else implicit(group, elem, value)

    def ref(instance, reason=None):
        parts = [el(0x0008, 0x1150, b"UI", pad(CT_IMAGE, b"\0")),
                 el(0x0008, 0x1155, b"UI", pad(instance, b"\0"))]
        if reason is not None:
            parts.append(el(0x0008, 0x1197, b"US", struct.pack("<H", reason)))
        return item(parts, undefined)

    ds = el(0x0008, 0x1195, b"UI", pad(TRANSACTION, b"\0"))
    if failed:
        ds += sequence(0x0008, 0x1198, [ref(INSTANCE + ".9", 0x0112)], is_explicit, undefined)
    ds += sequence(0x0008, 0x1199, [ref(INSTANCE), ref(INSTANCE + ".2")], is_explicit, undefined)
    return ds


for name, is_explicit, undefined, failed in [
    ("implicit-committed", False, True, False),
    ("implicit-failures", False, False, True),
    ("explicit-committed", True, False, False),
    ("explicit-failures", True, True, True),
]:
    seed("commitment_report", name, bytes([1 if is_explicit else 0]) + commitment(is_explicit, undefined, failed))

for target, files in SEEDS.items():
    d = CORPUS / target
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    print(f"{target}: {len(files)} seeds")
