"""C-FIND matching: parse_query for every match kind and refusal, matches_in_python semantics (PN, ranges,
combined date-time, sequences, character sets), and agreement of the SQL path with the Python path over
a generated index (SQLite in memory, and PostgreSQL when reachable)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pydicom.config
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.multival import MultiValue
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from qrproxy.index.models import Base, Instance, Patient, Series, Study, WorklistItem
from qrproxy.index.writers import normalize_name
from qrproxy.query.matching import (
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, UNABLE_TO_PROCESS, MatchKind, Query, QueryError, key_clause,
    matches_in_python, parse_query, residual_keys, select_matching, where_clauses,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture(autouse=True, scope="module")
def _quiet_pydicom() -> Iterator[None]:
    """Query values such as `M*` in a CS are valid C-FIND keys but not valid stored values: pydicom
    would warn on every one."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    yield
    settings.reading_validation_mode, settings.writing_validation_mode = saved


def make_ds(values: dict[str, Any]) -> Dataset:
    """A dataset from keywords; a list of dicts is a sequence, a None value is left out."""
    ds = Dataset()
    for keyword, value in values.items():
        if value is None:
            continue
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = [make_ds(item) for item in value]
        setattr(ds, keyword, value)
    return ds


def q(level: str | None, model: str = "study", **keys: Any) -> Query:
    return parse_query(make_ds(keys), level, model)


def match(query: Query, **values: Any) -> bool:
    return matches_in_python(query, make_ds(values))


def roundtrip(ds: Dataset) -> Dataset:
    """Encode as on the wire (explicit VR little endian) and decode, as pynetdicom hands identifiers over."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return dcmread(BytesIO(fp.getvalue()), force=True)


# --- parse_query: match kinds -------------------------------------------------------------------


def test_universal_single_wildcard_list_range_kinds() -> None:
    query = q("STUDY", StudyInstanceUID="", PatientName="Doe*", AccessionNumber="A1", ModalitiesInStudy="CT\\MR",
              StudyDate="20260101-", StudyTime="-1015", StudyDescription="")
    assert query["StudyInstanceUID"].kind is MatchKind.UNIVERSAL
    assert query["StudyDescription"].kind is MatchKind.UNIVERSAL
    assert query["PatientName"].kind is MatchKind.WILDCARD and query["PatientName"].values == ("DOE*",)
    assert query["AccessionNumber"].kind is MatchKind.SINGLE and query["AccessionNumber"].values == ("A1",)
    assert query["ModalitiesInStudy"].kind is MatchKind.LIST and query["ModalitiesInStudy"].values == ("CT", "MR")
    date, time = query["StudyDate"], query["StudyTime"]
    assert (date.kind, date.lower, date.upper) == (MatchKind.RANGE, "20260101", None)
    assert (time.kind, time.lower, time.upper) == (MatchKind.RANGE, None, "1015")
    assert {k.keyword for k in query.active_keys} == {"PatientName", "AccessionNumber", "ModalitiesInStudy",
                                                      "StudyDate", "StudyTime"}


def test_uid_list_and_closed_range() -> None:
    query = q("STUDY", StudyInstanceUID=["1.2.3", "1.2.4"], StudyDate="20260101-20260131", StudyTime="080000-120000.5")
    assert query["StudyInstanceUID"].kind is MatchKind.LIST
    assert query["StudyInstanceUID"].values == ("1.2.3", "1.2.4")
    assert (query["StudyDate"].lower, query["StudyDate"].upper) == ("20260101", "20260131")
    assert (query["StudyTime"].lower, query["StudyTime"].upper) == ("080000", "120000.5")


def test_star_alone_is_universal_for_any_vr_and_dash_alone_too() -> None:
    query = q("STUDY", PatientName="*", StudyInstanceUID="*", StudyDate="-", AccessionNumber="**")
    assert all(k.kind is MatchKind.UNIVERSAL for k in query.keys.values() if k.keyword != "QueryRetrieveLevel")


def test_legacy_date_and_time_forms_are_normalised() -> None:
    query = q("STUDY", StudyDate="2026.01.01-2026.01.31", StudyTime="10:15")
    assert (query["StudyDate"].lower, query["StudyDate"].upper) == ("20260101", "20260131")
    assert query["StudyTime"].values == ("1015",)


def test_pn_key_is_normalised_like_the_index() -> None:
    query = q("PATIENT", "patient", PatientName=" doe ^ john ^^")
    assert query["PatientName"].values == ("DOE^JOHN",)
    assert query["PatientName"].values[0] == normalize_name("Doe^John^^")


def test_dt_range_with_utc_offsets() -> None:
    query = q("IMAGE", "patient", PatientID="P", StudyInstanceUID="1.2", SeriesInstanceUID="1.3",
              AcquisitionDateTime="20260101120000+0100-20260102")
    key = query["AcquisitionDateTime"]
    assert (key.kind, key.lower, key.upper) == (MatchKind.RANGE, "20260101120000", "20260102")
    single = q("IMAGE", "patient", PatientID="P", StudyInstanceUID="1.2", SeriesInstanceUID="1.3",
               AcquisitionDateTime="20260101120000-0500")
    assert single["AcquisitionDateTime"].kind is MatchKind.SINGLE


def test_sequence_keys_are_exposed_with_paths() -> None:
    query = q(None, "worklist", PatientName="",
              ScheduledProcedureStepSequence=[{"Modality": "CT", "ScheduledStationAETitle": "CT1",
                                               "ScheduledProcedureStepStartDate": "20260105-20260106",
                                               "ScheduledPerformingPhysicianName": ""}])
    sps = query["ScheduledProcedureStepSequence"]
    assert sps.kind is MatchKind.SEQUENCE and sps.item is not None
    assert sps.item["Modality"].kind is MatchKind.SINGLE
    assert sps.item["Modality"].path == "ScheduledProcedureStepSequence.Modality"
    assert sps.item["ScheduledProcedureStepStartDate"].kind is MatchKind.RANGE
    assert sps.item["ScheduledPerformingPhysicianName"].kind is MatchKind.UNIVERSAL


def test_empty_sequence_or_empty_item_is_universal() -> None:
    assert q(None, "worklist", ScheduledProcedureStepSequence=[])["ScheduledProcedureStepSequence"].kind \
        is MatchKind.UNIVERSAL
    query = q(None, "worklist", ScheduledProcedureStepSequence=[{"Modality": ""}])
    assert query["ScheduledProcedureStepSequence"].kind is MatchKind.UNIVERSAL


def test_return_keys_list_everything_including_empty_keys_and_sequence_children() -> None:
    query = q(None, "worklist", SpecificCharacterSet="ISO_IR 192", PatientName="", PatientID="X",
              ScheduledProcedureStepSequence=[{"Modality": "", "ScheduledStationAETitle": "CT1"}],
              ReferencedStudySequence=[])
    names = [r.keyword for r in query.return_keys]
    assert names == ["SpecificCharacterSet", "ReferencedStudySequence", "PatientName", "PatientID",
                     "ScheduledProcedureStepSequence"]
    sps = query.return_keys[-1]
    assert sps.vr == "SQ" and [c.keyword for c in sps.children] == ["Modality", "ScheduledStationAETitle"]
    assert query.return_keys[1].children == ()


def test_return_only_keys_never_match() -> None:
    query = q("STUDY", NumberOfStudyRelatedInstances="5", QueryRetrieveLevel="STUDY", RetrieveAETitle="X")
    assert not query.active_keys
    assert match(query, StudyInstanceUID="1.2")


def test_combined_datetime_only_when_asked_and_shaped() -> None:
    ds = make_ds({"StudyDate": "20260101-20260102", "StudyTime": "2200-0600"})
    assert parse_query(ds, "STUDY", "study").combined == ()
    combined = parse_query(ds, "STUDY", "study", combined_datetime=True).combined
    assert len(combined) == 1
    assert (combined[0].lower, combined[0].upper) == (("20260101", "2200"), ("20260102", "0600"))
    single_time = make_ds({"StudyDate": "20260101-20260102", "StudyTime": "2200"})
    assert parse_query(single_time, "STUDY", "study", combined_datetime=True).combined == ()


def test_level_from_identifier() -> None:
    assert parse_query(make_ds({"QueryRetrieveLevel": "series", "StudyInstanceUID": "1.2"}), None, "study").level \
        == "SERIES"


# --- parse_query: refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "model", "keys", "status"),
    [
        ("STUDY", "study", {"StudyInstanceUID": "1.2.3-1.2.9"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        ("STUDY", "study", {"StudyInstanceUID": "1.2.*"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        ("STUDY", "study", {"StudyDate": "2026*"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        ("STUDY", "study", {"StudyDate": "20260101-\\20260105"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        ("STUDY", "study", {"StudyDate": "2026-01-01"}, UNABLE_TO_PROCESS),
        ("STUDY", "study", {"StudyDate": "20260231x"}, UNABLE_TO_PROCESS),
        ("STUDY", "study", {"StudyTime": "25h"}, UNABLE_TO_PROCESS),
        ("PATIENT", "study", {}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),  # no PATIENT level in study root
        ("FRAME", "patient", {}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        (None, "patient", {}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),  # QueryRetrieveLevel missing
        # hierarchical: unique keys above the level, single valued
        ("SERIES", "study", {"Modality": "CT"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        ("SERIES", "study", {"StudyInstanceUID": ""}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        ("STUDY", "patient", {"PatientID": "P*"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        # hierarchical: no non-unique keys with values above the level
        ("SERIES", "study", {"StudyInstanceUID": "1.2", "PatientName": "DOE*"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        ("STUDY", "patient", {"PatientID": "P1", "PatientSex": "F"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        # keys below the level
        ("STUDY", "study", {"Modality": "CT"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        ("PATIENT", "patient", {"StudyDate": "20260101"}, IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
    ],
)
def test_refusals(level: str | None, model: str, keys: dict[str, Any], status: int) -> None:
    with pytest.raises(QueryError) as err:
        parse_query(make_ds(keys), level, model)
    assert err.value.status == status
    assert 0 < len(err.value.comment) <= 64


def test_wildcard_on_integer_string_from_the_wire_is_refused() -> None:
    """pydicom cannot convert `5*` to an IS; the key is still classified and refused, not crashed on."""
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, make_ds({"StudyInstanceUID": "1.2", "SeriesNumber": "5"}))
    data = encoded.getvalue().replace(b"IS\x02\x005 ", b"IS\x02\x005*")
    assert data != encoded.getvalue()
    with pytest.raises(QueryError) as err:
        parse_query(dcmread(BytesIO(data), force=True), "SERIES", "study")
    assert err.value.status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


def test_non_integer_is_value_is_unable_to_process() -> None:
    with pytest.raises(QueryError) as err:
        parse_query(make_ds({"StudyInstanceUID": "1.2", "SeriesNumber": "2.5"}), "SERIES", "study")
    assert err.value.status == UNABLE_TO_PROCESS


def test_several_items_in_a_query_sequence_are_refused() -> None:
    with pytest.raises(QueryError) as err:
        q(None, "worklist", ScheduledProcedureStepSequence=[{"Modality": "CT"}, {"Modality": "MR"}])
    assert err.value.status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS


def test_hierarchical_accepts_unique_keys_and_empty_return_keys_above_the_level() -> None:
    query = q("IMAGE", "patient", PatientID="P1", StudyInstanceUID=["1.2", "1.3"], SeriesInstanceUID="1.2.1",
              PatientName="", StudyDate="", Modality="", SOPInstanceUID="", InstanceNumber="1")
    assert {k.keyword for k in query.active_keys} == {"PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                                      "InstanceNumber"}
    # PatientID wildcards are tolerated at the PATIENT level, where it is the query level's key
    assert q("PATIENT", "patient", PatientID="P00*")["PatientID"].kind is MatchKind.WILDCARD


def test_relational_accepts_keys_of_any_higher_level() -> None:
    ds = make_ds({"PatientName": "DOE*", "StudyDate": "20260101-", "Modality": "CT"})
    query = parse_query(ds, "SERIES", "study", relational=True)
    assert {k.keyword for k in query.active_keys} == {"PatientName", "StudyDate", "Modality"}
    with pytest.raises(QueryError):
        parse_query(make_ds({"PatientName": "DOE*", "SOPClassUID": CT}), "SERIES", "study", relational=True)


# --- matches_in_python --------------------------------------------------------------------------


def test_pn_case_insensitive_and_trailing_components_ignored() -> None:
    query = q("PATIENT", "patient", PatientName="DOE^JOHN")
    assert match(query, PatientName="Doe^John^^")
    assert match(query, PatientName="doe^john")
    assert match(query, PatientName="Doe ^ John")
    assert not match(query, PatientName="Doe^Johnny")
    assert not match(query, PatientName="Doe^John^A")
    assert match(q("PATIENT", "patient", PatientName="doe^john^^="), PatientName="DOE^JOHN")


def test_pn_wildcards() -> None:
    assert match(q("PATIENT", "patient", PatientName="d?e*"), PatientName="Doe^John")
    assert match(q("PATIENT", "patient", PatientName="*JOHN"), PatientName="Doe^John")
    assert not match(q("PATIENT", "patient", PatientName="*JOHN"), PatientName="Doe^Johnny")
    assert match(q("PATIENT", "patient", PatientName="*^JOHN*"), PatientName="Doe^Johnny")
    assert match(q("PATIENT", "patient", PatientName="O_BRIEN*"), PatientName="O_Brien^Pat")
    assert not match(q("PATIENT", "patient", PatientName="O_BRIEN*"), PatientName="OXBrien^Pat")
    assert match(q("PATIENT", "patient", PatientName="50%*"), PatientName="50%^Name")


def test_pn_non_ascii_case_folding() -> None:
    assert match(q("PATIENT", "patient", PatientName="müller^HANS"), PatientName="MÜLLER^Hans")
    assert match(q("PATIENT", "patient", PatientName="élise*"), PatientName="Élise^Dupont")
    assert match(q("PATIENT", "patient", PatientName="M?LLER*"), PatientName="Müller^Hans")  # ? = one character
    assert match(q("PATIENT", "patient", PatientName="STRASSE"), PatientName="Straße")  # full Unicode upper
    assert not match(q("PATIENT", "patient", PatientName="MULLER*"), PatientName="Müller^Hans")  # accents count


def test_pn_groups_match_on_the_whole_value_like_orthanc() -> None:
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert match(q("PATIENT", "patient", PatientName="Yamada*"), PatientName=name)
    assert match(q("PATIENT", "patient", PatientName="YAMADA^TAROU=*"), PatientName=name)
    assert match(q("PATIENT", "patient", PatientName="*=山田^太郎=*"), PatientName=name)
    assert match(q("PATIENT", "patient", PatientName="yamada^tarou=山田^太郎=やまだ^たろう"), PatientName=name)
    # not per group: the ideographic group is not the start of the value, and exact needs all groups
    assert not match(q("PATIENT", "patient", PatientName="山田*"), PatientName=name)
    assert not match(q("PATIENT", "patient", PatientName="YAMADA^TAROU"), PatientName=name)
    # trailing empty groups are dropped like trailing empty components
    assert match(q("PATIENT", "patient", PatientName="YAMADA^TAROU"), PatientName="Yamada^Tarou==")


def test_other_strings_are_case_sensitive_and_literal() -> None:
    assert match(q("STUDY", AccessionNumber="ACC1"), AccessionNumber="ACC1")
    assert not match(q("STUDY", AccessionNumber="acc1"), AccessionNumber="ACC1")
    assert not match(q("STUDY", StudyDescription="ct*"), StudyDescription="CT Chest")
    assert match(q("STUDY", StudyDescription="CT*"), StudyDescription="CT Chest")
    assert match(q("STUDY", StudyDescription="*50%*"), StudyDescription="Low dose 50% CT")
    assert not match(q("STUDY", StudyDescription="Knee_*"), StudyDescription="KneeXLeft")
    assert match(q("STUDY", StudyDescription="Knee_*"), StudyDescription="Knee_Left")


def test_absent_or_empty_values_never_match_a_non_universal_key() -> None:
    assert not match(q("STUDY", AccessionNumber="A*"))
    assert not match(q("STUDY", AccessionNumber="?*"), AccessionNumber="")
    assert not match(q("STUDY", StudyDate="-20260101"), StudyDate="")
    assert match(q("STUDY", AccessionNumber=""))  # universal
    assert match(q("STUDY", AccessionNumber="*"))  # universal too


def test_lists_and_multivalued_entities() -> None:
    query = q("STUDY", StudyInstanceUID="", ModalitiesInStudy="CT\\MR")
    assert match(query, ModalitiesInStudy=["US", "MR"])
    assert not match(query, ModalitiesInStudy=["US", "SR"])
    assert match(q("STUDY", ModalitiesInStudy="M*"), ModalitiesInStudy=["CT", "MR"])
    assert match(q("STUDY", StudyInstanceUID="1.2\\1.3"), StudyInstanceUID="1.3")
    assert not match(q("STUDY", StudyInstanceUID="1.2\\1.3"), StudyInstanceUID="1.2.3")


def test_numbers_compare_numerically() -> None:
    query = q("SERIES", StudyInstanceUID="1.2", SeriesNumber="3")
    assert match(query, StudyInstanceUID="1.2", SeriesNumber="03")
    assert not match(query, StudyInstanceUID="1.2", SeriesNumber="13")
    assert match(q("SERIES", StudyInstanceUID="1.2", SeriesNumber="1\\3"), StudyInstanceUID="1.2", SeriesNumber=3)


def test_date_ranges() -> None:
    assert match(q("STUDY", StudyDate="20260101-20260131"), StudyDate="20260131")
    assert not match(q("STUDY", StudyDate="20260101-20260131"), StudyDate="20260201")
    assert match(q("STUDY", StudyDate="20260101-"), StudyDate="20991231")
    assert not match(q("STUDY", StudyDate="-20260101"), StudyDate="20260102")
    assert match(q("STUDY", StudyDate="20260115"), StudyDate="20260115")


def test_time_ranges_upper_bound_at_its_own_precision() -> None:
    query = q("STUDY", StudyTime="0800-1015")
    assert match(query, StudyTime="080000")
    assert match(query, StudyTime="101559.999")  # still 10:15
    assert not match(query, StudyTime="1016")
    assert not match(query, StudyTime="075959")
    assert match(q("STUDY", StudyTime="101530-"), StudyTime="101530.5")
    assert not match(q("STUDY", StudyTime="101530-"), StudyTime="1015")  # 10:15:00 is before 10:15:30
    assert match(q("STUDY", StudyTime="-101530"), StudyTime="1015")


def test_independent_date_and_time_ranges_by_default() -> None:
    query = q("STUDY", StudyDate="20260101-20260102", StudyTime="2200-0600")
    assert not match(query, StudyDate="20260101", StudyTime="230000")  # no time is >= 22:00 and <= 06:00


def test_combined_date_and_time_range() -> None:
    def combined(**keys: Any) -> Query:
        return parse_query(make_ds(keys), "STUDY", "study", combined_datetime=True)

    night = combined(StudyDate="20260101-20260102", StudyTime="2200-0600")
    assert match(night, StudyDate="20260101", StudyTime="230000")
    assert match(night, StudyDate="20260102", StudyTime="0559")
    assert not match(night, StudyDate="20260101", StudyTime="2159")
    assert not match(night, StudyDate="20260102", StudyTime="0601")
    assert not match(night, StudyDate="20260101")  # the boundary day needs a time
    open_end = combined(StudyDate="20260105-", StudyTime="1200-")
    assert match(open_end, StudyDate="20260106", StudyTime="0100")
    assert not match(open_end, StudyDate="20260105", StudyTime="1100")
    one_day = combined(StudyDate="20260110", StudyTime="0800-1000")
    assert match(one_day, StudyDate="20260110", StudyTime="0930")
    assert not match(one_day, StudyDate="20260111", StudyTime="0930")
    date_only_upper = combined(StudyDate="20260101-20260102", StudyTime="2200-")
    assert match(date_only_upper, StudyDate="20260102", StudyTime="2359")


def test_sequence_matching_any_item() -> None:
    query = q(None, "worklist", ScheduledProcedureStepSequence=[{"Modality": "CT", "ScheduledStationAETitle": "CT*"}])
    assert match(query, ScheduledProcedureStepSequence=[{"Modality": "MR", "ScheduledStationAETitle": "CT1"},
                                                        {"Modality": "CT", "ScheduledStationAETitle": "CT2"}])
    assert not match(query, ScheduledProcedureStepSequence=[{"Modality": "MR", "ScheduledStationAETitle": "CT1"},
                                                            {"Modality": "CT", "ScheduledStationAETitle": "MR2"}])
    assert not match(query, PatientID="X")  # no sequence at all
    assert match(q(None, "worklist", ScheduledProcedureStepSequence=[]), PatientID="X")


def test_combined_range_inside_the_step_sequence() -> None:
    ds = make_ds({"ScheduledProcedureStepSequence": [{"ScheduledProcedureStepStartDate": "20260105-20260106",
                                                      "ScheduledProcedureStepStartTime": "1800-0800"}]})
    query = parse_query(ds, None, "worklist", combined_datetime=True)
    step = query["ScheduledProcedureStepSequence"].item
    assert step is not None and len(step.combined) == 1
    assert match(query, ScheduledProcedureStepSequence=[{"ScheduledProcedureStepStartDate": "20260105",
                                                         "ScheduledProcedureStepStartTime": "2300"}])
    assert not match(query, ScheduledProcedureStepSequence=[{"ScheduledProcedureStepStartDate": "20260106",
                                                             "ScheduledProcedureStepStartTime": "0900"}])


# --- character sets -----------------------------------------------------------------------------


def test_japanese_identifier_decoded_from_iso_2022() -> None:
    ident = make_ds({"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "QueryRetrieveLevel": "PATIENT",
                     "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"})
    wire = roundtrip(ident)
    assert "山田" in str(wire.PatientName)
    query = parse_query(wire, None, "patient")
    assert query["PatientName"].values == ("YAMADA^TAROU=山田^太郎=やまだ^たろう",)
    entity = roundtrip(make_ds({"SpecificCharacterSet": "ISO_IR 192",
                                "PatientName": "YAMADA^Tarou^^=山田^太郎=やまだ^たろう"}))
    assert matches_in_python(query, entity)
    wildcard = roundtrip(make_ds({"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "QueryRetrieveLevel": "PATIENT",
                                  "PatientName": "yamada^*=山田*"}))
    assert matches_in_python(parse_query(wildcard, None, "patient"), entity)


def test_half_width_katakana_identifier_decoded_from_iso_2022_ir_13() -> None:
    """PS3.5 H.3.2: ISO 2022 IR 13 (JIS X 0201) as the default set, JIS X 0208 by escape sequence."""
    name = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"
    wire = roundtrip(make_ds({"SpecificCharacterSet": ["ISO 2022 IR 13", "ISO 2022 IR 87"],
                              "QueryRetrieveLevel": "PATIENT", "PatientName": name}))
    query = parse_query(wire, None, "patient")
    assert query["PatientName"].values == (name,)  # no upper case for katakana and kanji
    entity = roundtrip(make_ds({"SpecificCharacterSet": "ISO_IR 192", "PatientName": name}))
    assert matches_in_python(query, entity)
    prefix = roundtrip(make_ds({"SpecificCharacterSet": ["ISO 2022 IR 13", "ISO 2022 IR 87"],
                                "QueryRetrieveLevel": "PATIENT", "PatientName": "ﾔﾏﾀﾞ*"}))
    assert matches_in_python(parse_query(prefix, None, "patient"), entity)
    # '?' is one character: ﾀﾞ is two (a katakana and its voiced mark), 山 is one
    assert match(q("PATIENT", "patient", PatientName="ﾔﾏ??^*"), PatientName=name)
    assert match(q("PATIENT", "patient", PatientName="*=?田^*"), PatientName=name)


def test_letters_outside_latin_1_fold_case() -> None:
    """ISO_IR 192 names with letters Latin-1 lacks (Orthanc folds them too)."""
    wire = roundtrip(make_ds({"SpecificCharacterSet": "ISO_IR 192", "QueryRetrieveLevel": "PATIENT",
                              "PatientName": "wąsik^ł*"}))
    query = parse_query(wire, None, "patient")
    assert matches_in_python(query, make_ds({"PatientName": "Wąsik^Łukasz"}))
    assert not matches_in_python(query, make_ds({"PatientName": "Wasik^Lukasz"}))
    assert match(q("PATIENT", "patient", PatientName="*^ŁUKASZ"), PatientName="Wąsik^Łukasz")


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_latin_identifier_matches_utf8_entity(charset: str) -> None:
    wire = roundtrip(make_ds({"SpecificCharacterSet": charset, "QueryRetrieveLevel": "STUDY",
                              "PatientName": "müller*", "StudyDescription": "Épaule*"}))
    query = parse_query(wire, None, "study")
    entity = roundtrip(make_ds({"SpecificCharacterSet": "ISO_IR 192", "PatientName": "MÜLLER^Jürgen",
                                "StudyDescription": "Épaule gauche"}))
    assert matches_in_python(query, entity)
    assert not matches_in_python(query, make_ds({"PatientName": "MULLER^Jurgen", "StudyDescription": "Épaule"}))


# --- SQL translation ----------------------------------------------------------------------------


def test_key_clause_none_without_a_column_and_residual_keys() -> None:
    query = q("STUDY", PatientAge="045Y", PatientName="DOE*", ReferringPhysicianName="SMITH*")
    assert key_clause(query["PatientAge"], "study") is None
    assert key_clause(query["PatientName"], "study") is not None
    assert sorted(residual_keys(query)) == ["PatientAge", "ReferringPhysicianName"]
    assert len(where_clauses(query)) == 2  # PatientName exact, ReferringPhysicianName as a superset
    worklist = q(None, "worklist", ScheduledProcedureStepSequence=[{"Modality": "CT",
                                                                    "ScheduledPerformingPhysicianName": "X*"}])
    assert residual_keys(worklist) == ["ScheduledProcedureStepSequence.ScheduledPerformingPhysicianName"]
    assert residual_keys(q(None, "worklist", ScheduledProcedureStepSequence=[{"Modality": "CT"}])) == []


def test_upper_to_ascii_list_is_complete() -> None:
    """The PN superset prefilter relies on knowing every character Python upper-cases into ASCII."""
    import sys

    from qrproxy.query.matching import _UPPER_TO_ASCII

    found = [chr(i) for i in range(128, sys.maxunicode + 1)
             if not 0xD800 <= i < 0xE000 and any(c.isascii() for c in chr(i).upper())]
    assert "".join(found) == _UPPER_TO_ASCII


def test_where_clauses_level_keeps_higher_levels_only() -> None:
    keys = {"PatientName": "D*", "StudyDate": "20260101", "Modality": "CT", "InstanceNumber": "1"}
    query = parse_query(make_ds(keys), "IMAGE", "patient", relational=True)
    assert len(where_clauses(query)) == 4
    assert len(where_clauses(query, "STUDY")) == 2
    assert len(where_clauses(query, "PATIENT")) == 1


def test_sql_escapes_like_metacharacters_and_is_case_sensitive() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        p = Patient(patient_id="P_1", patient_name="O_Brien^Pat", patient_name_norm=normalize_name("O_Brien^Pat"))
        s.add_all([p, Patient(patient_id="PX1", patient_name="OXBrien^Pat", patient_name_norm="OXBRIEN^PAT"),
                   Patient(patient_id="p_1", patient_name="x", patient_name_norm="X"),
                   Patient(patient_id="P%9", patient_name="50%^A", patient_name_norm="50%^A"),
                   Patient(patient_id="P[1]", patient_name="y", patient_name_norm="Y")])
        s.commit()

        def ids(**keys: Any) -> set[str]:
            return {r.patient_id for r in s.scalars(select_matching(q("PATIENT", "patient", **keys)))}

        assert ids(PatientID="P_*") == {"P_1"}
        assert ids(PatientID="P?1") == {"P_1", "PX1"}
        assert ids(PatientID="P%*") == {"P%9"}
        assert ids(PatientID="P[*") == {"P[1]"}
        assert ids(PatientName="o_brien*") == {"P_1"}
        assert ids(PatientName="*%*") == {"P%9"}
    engine.dispose()


# --- SQL vs Python agreement over a generated index ---------------------------------------------

FAMILY = ["Doe", "Smith", "Müller", "García", "O_Brien", "Ångström", "Dupont", "Nguyen", "Straße", "Łukasz",
          "50%Perc", "Élise", "van der Berg", "Yamada", "Suzuki"]
GIVEN = ["John", "Jane", "Hans", "José", "Zoë", "Tarou", "Hanako", "", "Anne-Marie"]
JAPANESE = {"Yamada": "山田=やまだ", "Suzuki": "鈴木=すずき"}
MODALITIES = ["CT", "MR", "US", "CR", "SR", "PT", None]
DESCRIPTIONS = ["CT Chest", "ct chest", "MR Brain", "Knee_Left", "KneeXLeft", "Low dose 50% CT", "Épaule", None]
SERIES_DESC = ["Axial 5mm", "axial 1mm", "Sagittal", "Scout", None]
BODY = ["CHEST", "HEAD", "KNEE", "ABDOMEN", None]


def _name(rng: random.Random) -> str:
    family, given = rng.choice(FAMILY), rng.choice(GIVEN)
    name = f"{family}^{given}" if given else family
    name = rng.choice([name, name.upper(), name.lower(), name + "^^", f"{family} ^ {given}^^^"])
    if family in JAPANESE and rng.random() < 0.7:
        ideo, phon = JAPANESE[family].split("=")
        name = f"{family}^{given}={ideo}^太郎={phon}^たろう" + rng.choice(["", "="])
    return name


def _date(rng: random.Random, start: int, span: int) -> str | None:
    import datetime as dt

    if rng.random() < 0.08:
        return None
    return (dt.date(start, 1, 1) + dt.timedelta(days=rng.randrange(span))).strftime("%Y%m%d")


def _time(rng: random.Random) -> str | None:
    if rng.random() < 0.08:
        return None
    h, m, s = rng.randrange(24), rng.randrange(60), rng.randrange(60)
    return rng.choice([f"{h:02d}{m:02d}{s:02d}", f"{h:02d}{m:02d}", f"{h:02d}{m:02d}{s:02d}.{rng.randrange(1000):03d}"])


class Index:
    """Generated rows in the database, and the same entities as datasets for the Python side."""

    def __init__(self, engine: Engine, seed: int = 20260101):
        rng = random.Random(seed)
        self.engine = engine
        self.rows: dict[str, list[tuple[int, Dataset]]] = {lv: [] for lv in ("PATIENT", "STUDY", "SERIES", "IMAGE")}
        self.values: dict[str, list[Any]] = {}
        with Session(engine) as s:
            for i in range(160):
                self._patient(s, rng, i)
            s.commit()
            self._datasets(s)
            self.worklist = self._worklist(s, rng)
            s.commit()

    def _patient(self, s: Session, rng: random.Random, i: int) -> None:
        name = _name(rng) if rng.random() > 0.03 else None
        pid = rng.choice([f"PID{i:04d}", f"P_{i}", f"P%{i}", f"pid{i:04d}"])
        patient = Patient(patient_id=pid, patient_name=name, patient_name_norm=normalize_name(name),
                          birth_date=_date(rng, 1930, 90 * 365), sex=rng.choice(["M", "F", "O", None]))
        s.add(patient)
        for j in range(rng.randrange(0, 4)):
            study = Study(study_instance_uid=f"1.2.826.0.1.{i}.{j}", patient=patient,
                          study_date=_date(rng, 2026, 60), study_time=_time(rng),
                          accession_number=rng.choice([f"ACC{i:03d}{j}", f"acc{i:03d}{j}", None]),
                          study_id=str(rng.randrange(1, 30)), study_description=rng.choice(DESCRIPTIONS),
                          referring_physician_name=_name(rng) if rng.random() < 0.7 else None)
            s.add(study)
            for k in range(rng.randrange(0, 4)):
                series = Series(series_instance_uid=f"{study.study_instance_uid}.{k}", study=study,
                                modality=rng.choice(MODALITIES), series_number=rng.choice([k + 1, None, 1]),
                                series_description=rng.choice(SERIES_DESC), body_part_examined=rng.choice(BODY))
                s.add(series)
                for n in range(rng.randrange(1, 4)):
                    s.add(Instance(sop_instance_uid=f"{series.series_instance_uid}.{n}", series=series,
                                   sop_class_uid=rng.choice([CT, MR, SR]), instance_number=rng.choice([n + 1, None])))

    def _datasets(self, s: Session) -> None:
        """One dataset per row, with its parents' attributes, as a C-FIND answer at that level holds them."""
        pats: dict[int, dict[str, Any]] = {}
        for p in s.scalars(select(Patient)):
            pats[p.id] = {"PatientID": p.patient_id, "PatientName": p.patient_name, "PatientBirthDate": p.birth_date,
                          "PatientSex": p.sex}
            self.rows["PATIENT"].append((p.id, make_ds(pats[p.id])))
        studies: dict[int, dict[str, Any]] = {}
        for st in s.scalars(select(Study)):
            mods = sorted({se.modality for se in st.series if se.modality})
            studies[st.id] = pats[st.patient_pk] | {
                "StudyInstanceUID": st.study_instance_uid, "StudyDate": st.study_date, "StudyTime": st.study_time,
                "AccessionNumber": st.accession_number, "StudyID": st.study_id,
                "StudyDescription": st.study_description, "ReferringPhysicianName": st.referring_physician_name,
                "ModalitiesInStudy": mods or None}
            self.rows["STUDY"].append((st.id, make_ds(studies[st.id])))
        series: dict[int, dict[str, Any]] = {}
        for se in s.scalars(select(Series)):
            series[se.id] = studies[se.study_pk] | {
                "SeriesInstanceUID": se.series_instance_uid, "Modality": se.modality,
                "SeriesNumber": se.series_number, "SeriesDescription": se.series_description,
                "BodyPartExamined": se.body_part_examined}
            self.rows["SERIES"].append((se.id, make_ds(series[se.id])))
        for inst in s.scalars(select(Instance)):
            values = series[inst.series_pk] | {"SOPInstanceUID": inst.sop_instance_uid,
                                               "SOPClassUID": inst.sop_class_uid,
                                               "InstanceNumber": inst.instance_number}
            self.rows["IMAGE"].append((inst.id, make_ds(values)))
        for level, rows in self.rows.items():
            self.values[level] = [ds for _, ds in rows]

    def _worklist(self, s: Session, rng: random.Random) -> list[tuple[int, Dataset]]:
        out = []
        for i in range(150):
            name = _name(rng)
            step = {"ScheduledStationAETitle": rng.choice(["CT1", "CT2", "MR1", "US_1", None]),
                    "ScheduledStationName": rng.choice(["Room 1", "room 2", None]),
                    "Modality": rng.choice(MODALITIES), "ScheduledProcedureStepID": f"SPS{i}",
                    "ScheduledProcedureStepStartDate": _date(rng, 2026, 20),
                    "ScheduledProcedureStepStartTime": _time(rng)}
            values = {"PatientID": f"W{i:03d}", "PatientName": name, "AccessionNumber": f"WACC{i:03d}",
                      "RequestedProcedureID": f"RP{i % 7}", "StudyInstanceUID": f"1.2.826.0.2.{i}",
                      "ScheduledProcedureStepSequence": [step]}
            item = WorklistItem(source_node="RIS", item_key=f"k{i}", patient_id=values["PatientID"],
                                patient_name_norm=normalize_name(name), accession_number=values["AccessionNumber"],
                                requested_procedure_id=values["RequestedProcedureID"],
                                study_instance_uid=values["StudyInstanceUID"],
                                scheduled_station_ae=step["ScheduledStationAETitle"],
                                scheduled_station_name=step["ScheduledStationName"], modality=step["Modality"],
                                sps_id=step["ScheduledProcedureStepID"],
                                sps_start_date=step["ScheduledProcedureStepStartDate"],
                                sps_start_time=step["ScheduledProcedureStepStartTime"], identifier=b"")
            s.add(item)
            s.flush()
            out.append((item.id, make_ds(values)))
        return out

    def compare(self, query: Query) -> tuple[set[int], int]:
        """Rows matched by SQL and by Python must be the same set (a superset from SQL when keys are
        residual, which Python then narrows to the same answer). Returns the matches and the total."""
        rows = self.worklist if query.model == "worklist" else self.rows[query.level or "STUDY"]
        with Session(self.engine) as s:
            sql = set(s.scalars(select(select_matching(query).subquery().c.id)))
        python = {row_id for row_id, ds in rows if matches_in_python(query, ds)}
        if residual_keys(query):
            assert sql >= python, f"SQL lost rows {sorted(python - sql)[:5]}"
            narrowed = {row_id for row_id, ds in rows if row_id in sql and matches_in_python(query, ds)}
            assert narrowed == python
        else:
            assert sql == python, (f"SQL only: {sorted(sql - python)[:5]}, Python only: {sorted(python - sql)[:5]}",
                                   [str(c) for c in where_clauses(query)])
        return python, len(rows)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index(request: pytest.FixtureRequest) -> Iterator[Index]:
    if request.param == "sqlite":
        engine = create_engine("sqlite://")
        url = None
    else:
        from peers import create_database, drop_database

        url = create_database(request.getfixturevalue("pg_base_url"))
        engine = create_engine(url)
    Base.metadata.create_all(engine)
    try:
        yield Index(engine)
    finally:
        engine.dispose()
        if url is not None:
            drop_database(url)


# (level, model, keys, relational, combined): ~60 query shapes over every kind and column
SHAPES: list[tuple[str | None, str, dict[str, Any], bool, bool]] = [
    ("PATIENT", "patient", {"PatientName": "DOE*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "doe^john"}, False, False),
    ("PATIENT", "patient", {"PatientName": "*JOHN*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "M?LLER*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "müller*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "Yamada*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "*=山田^太郎=*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "山田*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "O_BRIEN*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "*%*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "STRASSE*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "VAN DER BERG^JOSÉ"}, False, False),
    ("PATIENT", "patient", {"PatientName": "?O?^*"}, False, False),
    ("PATIENT", "patient", {"PatientName": "DOE\\SMITH^JANE"}, False, False),
    ("PATIENT", "patient", {"PatientID": "PID00*"}, False, False),
    ("PATIENT", "patient", {"PatientID": "P_1*"}, False, False),
    ("PATIENT", "patient", {"PatientID": "P%1?"}, False, False),
    ("PATIENT", "patient", {"PatientID": "pid*"}, False, False),
    ("PATIENT", "patient", {"PatientID": "PID0001\\PID0002\\P_3\\pid0004"}, False, False),
    ("PATIENT", "patient", {"PatientBirthDate": "19700101-19891231"}, False, False),
    ("PATIENT", "patient", {"PatientBirthDate": "-19500101"}, False, False),
    ("PATIENT", "patient", {"PatientBirthDate": "20000101-"}, False, False),
    ("PATIENT", "patient", {"PatientSex": "F", "PatientName": "*A*"}, False, False),
    ("PATIENT", "patient", {"PatientSex": "F\\O"}, False, False),
    ("STUDY", "study", {"StudyDate": "20260101-20260131"}, False, False),
    ("STUDY", "study", {"StudyDate": "20260115"}, False, False),
    ("STUDY", "study", {"StudyDate": "20260105\\20260106"}, False, False),
    ("STUDY", "study", {"StudyTime": "0800-1200"}, False, False),
    ("STUDY", "study", {"StudyTime": "-1015"}, False, False),
    ("STUDY", "study", {"StudyTime": "143000.5-"}, False, False),
    ("STUDY", "study", {"StudyDate": "20260101-20260110", "StudyTime": "2200-0600"}, False, False),
    ("STUDY", "study", {"StudyDate": "20260101-20260110", "StudyTime": "2200-0600"}, False, True),
    ("STUDY", "study", {"StudyDate": "20260105-", "StudyTime": "1200-"}, False, True),
    ("STUDY", "study", {"StudyDate": "-20260120", "StudyTime": "-0930"}, False, True),
    ("STUDY", "study", {"StudyDate": "20260110", "StudyTime": "0800-1600"}, False, True),
    ("STUDY", "study", {"StudyDate": "20260110-20260130", "StudyTime": "-1200"}, False, True),
    ("STUDY", "study", {"AccessionNumber": "ACC01*"}, False, False),
    ("STUDY", "study", {"AccessionNumber": "acc*"}, False, False),
    ("STUDY", "study", {"AccessionNumber": "ACC0010"}, False, False),
    ("STUDY", "study", {"StudyDescription": "ct*"}, False, False),
    ("STUDY", "study", {"StudyDescription": "*50%*"}, False, False),
    ("STUDY", "study", {"StudyDescription": "Knee_*"}, False, False),
    ("STUDY", "study", {"StudyDescription": "?paule"}, False, False),
    ("STUDY", "study", {"ReferringPhysicianName": "*müller*"}, False, False),
    ("STUDY", "study", {"ReferringPhysicianName": "SMITH^JANE"}, False, False),
    ("STUDY", "study", {"ReferringPhysicianName": "yamada^tarou=*"}, False, False),
    ("STUDY", "study", {"ModalitiesInStudy": "CT"}, False, False),
    ("STUDY", "study", {"ModalitiesInStudy": "CT\\MR"}, False, False),
    ("STUDY", "study", {"ModalitiesInStudy": "?R", "StudyID": "1?"}, False, False),
    ("STUDY", "study", {"StudyInstanceUID": "1.2.826.0.1.3.0\\1.2.826.0.1.5.1\\1.2.826.0.1.9.9"}, False, False),
    ("STUDY", "study", {"PatientName": "D*", "StudyDate": "20260101-20260215", "ModalitiesInStudy": "CT"}, False,
     False),
    ("STUDY", "study", {"PatientName": "", "StudyDate": "", "AccessionNumber": ""}, False, False),
    ("STUDY", "patient", {"PatientID": "PID0007", "StudyDate": "20260101-"}, False, False),
    ("SERIES", "study", {"StudyInstanceUID": "1.2.826.0.1.7.0", "Modality": ""}, False, False),
    ("SERIES", "study", {"Modality": "MR"}, True, False),
    ("SERIES", "study", {"SeriesNumber": "3"}, True, False),
    ("SERIES", "study", {"SeriesNumber": "1\\2"}, True, False),
    ("SERIES", "study", {"SeriesDescription": "*xial*"}, True, False),
    ("SERIES", "study", {"BodyPartExamined": "CHEST\\HEAD"}, True, False),
    ("SERIES", "study", {"Modality": "CT", "StudyDate": "20260110-20260131", "PatientName": "*E*"}, True, False),
    ("SERIES", "study", {"ModalitiesInStudy": "SR", "Modality": "CT"}, True, False),
    ("IMAGE", "patient", {"SOPClassUID": CT}, True, False),
    ("IMAGE", "patient", {"InstanceNumber": "2"}, True, False),
    ("IMAGE", "patient", {"SOPClassUID": f"{SR}\\{MR}", "PatientSex": "M", "Modality": "C*"}, True, False),
    ("IMAGE", "patient", {"SOPInstanceUID": "1.2.826.0.1.3.0.0.0\\1.2.826.0.1.4.0.0.1"}, True, False),
    ("IMAGE", "study", {"StudyTime": "1000-1800", "AccessionNumber": "ACC*", "InstanceNumber": "1"}, True, False),
]

WORKLIST_SHAPES: list[tuple[dict[str, Any], bool]] = [
    ({"PatientName": "DOE*"}, False),
    ({"PatientName": "*=山田*"}, False),
    ({"PatientID": "W01*", "AccessionNumber": ""}, False),
    ({"RequestedProcedureID": "RP3"}, False),
    ({"ScheduledProcedureStepSequence": [{"Modality": "CT"}]}, False),
    ({"ScheduledProcedureStepSequence": [{"ScheduledStationAETitle": "CT?"}]}, False),
    ({"ScheduledProcedureStepSequence": [{"ScheduledStationAETitle": "US_*"}]}, False),
    ({"ScheduledProcedureStepSequence": [{"ScheduledStationName": "room*"}]}, False),
    ({"ScheduledProcedureStepSequence": [{"ScheduledProcedureStepStartDate": "20260105-20260110"}]}, False),
    ({"ScheduledProcedureStepSequence": [{"ScheduledProcedureStepStartDate": "20260105-20260110",
                                          "ScheduledProcedureStepStartTime": "1800-0800"}]}, True),
    ({"ScheduledProcedureStepSequence": [{"ScheduledProcedureStepStartDate": "20260108-20260112",
                                          "ScheduledProcedureStepStartTime": "0800-1200",
                                          "Modality": "MR\\CT"}]}, True),
    ({"ScheduledProcedureStepSequence": [{"ScheduledProcedureStepStartTime": "-0900"}]}, False),
    ({"ScheduledProcedureStepSequence": [{"ScheduledProcedureStepID": "SPS1*", "Modality": ""}]}, False),
    ({"ScheduledProcedureStepSequence": [{"Modality": "CT", "ScheduledPerformingPhysicianName": ""}],
      "PatientName": "*A*"}, False),
    ({"StudyInstanceUID": "1.2.826.0.2.3\\1.2.826.0.2.30", "ScheduledProcedureStepSequence": []}, False),
]


@pytest.mark.parametrize(("level", "model", "keys", "relational", "combined"), SHAPES,
                         ids=[f"{i:02d}-{s[0]}-{'+'.join(s[2])}" for i, s in enumerate(SHAPES)])
def test_sql_and_python_agree(index: Index, level: str, model: str, keys: dict[str, Any], relational: bool,
                              combined: bool) -> None:
    query = parse_query(make_ds(keys), level, model, relational=relational, combined_datetime=combined)
    index.compare(query)


def test_shapes_are_selective(index: Index) -> None:
    """Guard against a vacuous agreement test: most shapes must match some rows but not all."""
    selective = 0
    for level, model, keys, relational, combined in SHAPES:
        query = parse_query(make_ds(keys), level, model, relational=relational, combined_datetime=combined)
        matched, total = index.compare(query)
        selective += 0 < len(matched) < total
    assert selective >= 0.85 * len(SHAPES)


@pytest.mark.parametrize(("keys", "combined"), WORKLIST_SHAPES, ids=[str(i) for i in range(len(WORKLIST_SHAPES))])
def test_worklist_sql_and_python_agree(index: Index, keys: dict[str, Any], combined: bool) -> None:
    matched, total = index.compare(parse_query(make_ds(keys), None, "worklist", combined_datetime=combined))
    assert 0 < len(matched) < total


def _random_identifier(rng: random.Random, index: Index) -> tuple[str, dict[str, Any]]:
    """A query built from values that exist (so it matches something), bent by wildcards and ranges."""
    level = rng.choice(["PATIENT", "STUDY", "SERIES", "IMAGE"])
    sample = rng.choice(index.values[level])
    keys: dict[str, Any] = {}
    candidates = [kw for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                                "StudyTime", "AccessionNumber", "StudyDescription", "ModalitiesInStudy", "Modality",
                                "SeriesNumber", "SeriesDescription", "InstanceNumber", "SOPClassUID",
                                "ReferringPhysicianName") if kw in sample]
    for kw in rng.sample(candidates, min(len(candidates), rng.randrange(1, 4))):
        value = sample.get(kw)
        text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
        keys[kw] = _bend(rng, kw, text)
    return level, keys


def _bend(rng: random.Random, keyword: str, text: str) -> str:
    if keyword in ("PatientName", "ReferringPhysicianName"):
        text = normalize_name(text) or text  # bend the form that is compared, so the sample still matches
    if keyword in ("PatientBirthDate", "StudyDate", "StudyTime"):
        cut = rng.choice([len(text), 4 if keyword == "StudyTime" else 8])
        return rng.choice([f"{text[:cut]}-", f"-{text[:cut]}", text, f"{text[:cut]}-{text[:cut]}"])
    if keyword in ("SeriesNumber", "InstanceNumber", "SOPClassUID", "ModalitiesInStudy"):
        return text
    choice = rng.randrange(5)
    if choice == 0 and len(text) > 2:
        return text[: rng.randrange(1, len(text))] + "*"
    if choice == 1 and len(text) > 3:
        start = rng.randrange(len(text) - 2)
        return "*" + text[start:start + 2] + "*"
    if choice == 2:
        pos = rng.randrange(len(text))
        return text[:pos] + "?" + text[pos + 1:]
    if choice == 3 and keyword in ("PatientName", "ReferringPhysicianName"):
        return rng.choice([text.lower(), text.swapcase(), text + "^^"])
    return text


def test_random_queries_agree(index: Index) -> None:
    """Property-style: 300 random relational queries derived from the data; SQL and Python must agree,
    and every query matches at least the row it was derived from."""
    rng = random.Random(7)
    for _ in range(300):
        level, keys = _random_identifier(rng, index)
        query = parse_query(make_ds(keys), level, rng.choice(["patient", "study"]) if level != "PATIENT" else "patient",
                            relational=True, combined_datetime=rng.random() < 0.3)
        matched, _ = index.compare(query)
        assert matched, keys
