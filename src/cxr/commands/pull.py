"""`cxr pull`: a cohort of X-rays from a PACS into a folder cxr trains, evaluates or calibrates on.

    cxr pull --from ORTHANC@pacs:4242 --query Modality=DX --query StudyDate=20260101-20260131 --output-dir cohort

1. Find: the instances a query matches (DICOM keywords, as `KEY=VALUE`; a date or time range as `FROM-TO`), or
   those of the accession numbers in a file: from a DIMSE node by C-FIND down the study root (study, series,
   image), or from a DICOMweb service by QIDO-RS.
2. Fetch each instance (C-GET, or WADO-RS), `--workers` at a time, on its own association or request.
3. Remove patient data on the way in (`data.deidentify`: PS3.15's Basic Profile as an allow-list; the patient's
   pseudonymous key keeps splits by patient), write the image atomically to `images/<patient key>/`, then add
   its row to `manifest.csv`: a pull killed at any point is resumed by the same command, which fetches only the
   instances the manifest lacks.

The folder: `manifest.csv` (sop_instance_uid, patient_key, accession_key, view, path), `images/`, and `.cxr-pull/`
with the secret the keys are made with (keep it private: with it, a known Patient ID or accession number can be
matched to its key; without it, not). `--keep-mapping FILE` also writes which key is which Patient ID and
accession number, to a separate file, only when asked.
"""

import csv
import os
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cxr.atomic import atomic_path, write_bytes

from cxr.commands.nodes import CREDENTIALS_HINT, DicomWebService, parse_node
from cxr.data.cohort import COLUMNS, MANIFEST, folder_secret, pseudonym, read_manifest
from cxr.errors import UserError, warn

MAPPING_COLUMNS = ("patient_key", "PatientID", "accession_key", "AccessionNumber", "sop_instance_uid")
# Where each query key is matched in the study root (C-FIND is hierarchical: a key is asked at its own level)
STUDY_KEYS = {"StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "StudyID", "ModalitiesInStudy",
              "PatientID", "PatientName", "PatientSex", "PatientBirthDate", "StudyInstanceUID",
              "ReferringPhysicianName", "InstitutionName"}
SERIES_KEYS = {"Modality", "SeriesDescription", "BodyPartExamined", "SeriesNumber", "SeriesDate", "ProtocolName",
               "SeriesInstanceUID", "Laterality"}
# Radiographs: the storage classes pulled (a C-GET asks the PACS to send these, a presentation context each)
RADIOGRAPHS = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
               "1.2.840.10008.5.1.4.1.1.7")  # CR, DX for presentation, DX for processing, Secondary Capture


@dataclass
class PullOptions:
    """What to pull: `query` ({DICOM keyword: value}), `accessions` (a file of accession numbers, one a line, or
    None), `workers` (instances fetched at once), `ae_title` (cxr's, for DIMSE), `keep_mapping` (a CSV path for
    the pseudonym mapping, or None)."""
    query: dict = field(default_factory=dict)
    accessions: Path = None
    workers: int = 4
    ae_title: str = "CXR"
    keep_mapping: Path = None


def parse_query(items):
    """['Modality=DX', ...] -> {keyword: value}; UserError for a key that is no DICOM keyword."""
    from pydicom.datadict import tag_for_keyword

    query = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or tag_for_keyword(key.strip()) is None:
            raise UserError(f"--query {item!r}: give KEY=VALUE with a DICOM keyword as KEY, e.g. Modality=DX, "
                            "StudyDate=20260101-20260131, BodyPartExamined=CHEST or StudyDescription=*THORAX*")
        query[key.strip()] = value.strip()
    return query


def read_accessions(path):
    """The accession numbers in a file, one a line (blank lines and a header 'AccessionNumber' skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--accessions {path}: not readable ({getattr(error, 'strerror', error)}); give a text file "
                        "with one accession number a line") from None
    numbers = [line.strip().split(",")[0].strip() for line in lines if line.strip()]
    numbers = [n for n in numbers if n.replace(" ", "").lower() not in ("accessionnumber", "accession_number")]
    if not numbers:
        raise UserError(f"--accessions {path}: holds no accession number; give one a line")
    return list(dict.fromkeys(numbers))


# --- finding the instances --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    """An instance as a query found it: its study, series and SOP instance UIDs, and its SOP class (None where the
    PACS did not say)."""
    study: str
    series: str
    sop: str
    sop_class: str = None

    @property
    def radiograph(self):
        return self.sop_class is None or self.sop_class in RADIOGRAPHS


def find_instances(node, query, accessions, ae_title):
    """Every Instance the query (and, when given, each accession number) matches, each once."""
    queries = [query | {"AccessionNumber": a} for a in accessions] if accessions else [query]
    found = {}
    for q in queries:
        for instance in (_qido(node, q) if isinstance(node, DicomWebService) else _c_find(node, q, ae_title)):
            found.setdefault(instance.sop, instance)
    return list(found.values())


def _qido(service, query):
    import requests

    try:
        client = service.client()
        answers = client.search_for_instances(search_filters=query, get_remaining=True)
    except requests.HTTPError as error:
        raise UserError(_http_refusal(service, error, "QIDO-RS")) from None
    except requests.RequestException as error:
        raise UserError(f"{service}: the DICOMweb service did not answer ({type(error).__name__}); check the URL "
                        "and that the server is up") from None

    def value(answer, tag):
        return answer.get(tag, {}).get("Value", [None])[0]

    return [Instance(value(a, "0020000D"), value(a, "0020000E"), value(a, "00080018"), value(a, "00080016"))
            for a in answers if value(a, "00080018")]


def _http_refusal(service, error, what):
    status = error.response.status_code if error.response is not None else None
    hint = CREDENTIALS_HINT if status in (401, 403) else "check the URL and the query"
    return f"{service}: {what} answered HTTP {status}; {hint}"


def _association(node, ae_title, contexts, roles=()):
    """An established association with `node`; UserError naming it when it is refused or not answered."""
    assoc = node.associate(ae_title, contexts, roles)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "did not answer, or dropped the association"
        raise UserError(f"{node} {why}; check its AE title, host and port, and that it lets AE title {ae_title} "
                        "query and retrieve (--ae-title)")
    return assoc


def _c_find(node, query, ae_title):
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    def identifier(level, keys, returned):
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword in returned:
            setattr(ds, keyword, "")
        for keyword, value in keys.items():
            setattr(ds, keyword, value)
        return ds

    def find(assoc, ds):
        answers = []
        for status, found in assoc.send_c_find(ds, FIND):
            if not status:
                raise UserError(f"{node} stopped answering the C-FIND; try again")
            if status.Status in (0xFF00, 0xFF01) and found is not None:
                answers.append(found)
            elif status.Status not in (0x0000, 0xFF00, 0xFF01):
                raise UserError(f"{node} refused the C-FIND (status 0x{status.Status:04X}); check the query keys")
        return answers

    study_keys = {k: v for k, v in query.items() if k in STUDY_KEYS}
    series_keys = {k: v for k, v in query.items() if k in SERIES_KEYS}
    image_keys = {k: v for k, v in query.items() if k not in STUDY_KEYS | SERIES_KEYS}
    assoc = _association(node, ae_title, [FIND])
    instances = []
    try:
        for study in find(assoc, identifier("STUDY", study_keys, ["StudyInstanceUID"])):
            uid = {"StudyInstanceUID": study.StudyInstanceUID}
            for series in find(assoc, identifier("SERIES", uid | series_keys, ["SeriesInstanceUID"])):
                keys = uid | {"SeriesInstanceUID": series.SeriesInstanceUID} | image_keys
                for image in find(assoc, identifier("IMAGE", keys, ["SOPInstanceUID", "SOPClassUID"])):
                    instances.append(Instance(study.StudyInstanceUID, series.SeriesInstanceUID,
                                              image.SOPInstanceUID, image.get("SOPClassUID") or None))
    finally:
        assoc.release()
    return instances


# --- fetching ---------------------------------------------------------------------------------------------
class Fetcher:
    """Fetches instances from one node on one association (DIMSE) or session (DICOMweb): `fetch(instance)` ->
    a pydicom Dataset, or raises with why not."""

    def __init__(self, node, ae_title):
        self.node, self.ae_title = node, ae_title
        self.assoc = self.client = None
        self.received = []

    def fetch(self, instance):
        if isinstance(self.node, DicomWebService):
            if self.client is None:
                self.client = self.node.client()
            return self.client.retrieve_instance(instance.study, instance.series, instance.sop)
        return self._c_get(instance)

    def _c_get(self, instance):
        from pydicom.dataset import Dataset
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        from cxr.data.dicom import DECODED_AS_INSTALLED

        if self.assoc is None or not self.assoc.is_established:
            contexts = [GET, *[(uid, [*DEFAULT_TRANSFER_SYNTAXES, *DECODED_AS_INSTALLED]) for uid in RADIOGRAPHS]]
            self.assoc = _association(self.node, self.ae_title, contexts,
                                      [build_role(uid, scp_role=True) for uid in RADIOGRAPHS])
            self.assoc.bind(evt.EVT_C_STORE, self._stored)
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = instance.study, instance.series, instance.sop
        self.received = []
        last = None
        for status, _ in self.assoc.send_c_get(ds, GET):
            if not status:
                self.assoc.abort()
                raise RuntimeError("the C-GET was not answered")
            last = status.Status
        if not self.received:
            raise RuntimeError(f"the C-GET sent no image (status 0x{last or 0:04X}; a class other than CR, DX or "
                               "Secondary Capture is not asked for)")
        return self.received[0]

    def _stored(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000

    def close(self):
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


# --- the folder -------------------------------------------------------------------------------------------
class Appended:
    """A CSV that rows are added to one at a time, each on disk (fsync) before the next: what a kill leaves is
    every row written before it. Made with its header, readable by its owner only when `private`."""

    def __init__(self, path, columns, private=False):
        new = not Path(path).is_file()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600 if private else 0o644)
        self.file = os.fdopen(fd, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, columns)
        if new:
            self.writer.writeheader()

    def add(self, row):
        self.writer.writerow(row)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


class Cohort:
    """The folder a pull writes into: each instance de-identified, written atomically, then its manifest row (and
    its mapping row, with --keep-mapping) added; counts of what happened, and why what was not pulled was not.
    Safe to call from several threads."""

    def __init__(self, folder, keep_mapping, done):
        self.folder, self.lock = Path(folder), threading.Lock()
        self.secret = folder_secret(self.folder, create=True)
        # rewritten whole (atomically) with the rows a kill kept, then appended to row by row
        with atomic_path(self.folder / MANIFEST) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows({c: r[c] for c in COLUMNS} for r in done)
        for partial in (self.folder / "images").glob("*/.*.partial.dcm"):  # a write a kill cut short
            partial.unlink()
        self.manifest = Appended(self.folder / MANIFEST, COLUMNS)
        self.mapping = Appended(keep_mapping, MAPPING_COLUMNS, private=True) if keep_mapping else None
        self.pulled, self.reasons = 0, Counter()

    def add(self, instance, ds):
        """Write the de-identified `ds` of `instance` and its rows; BurnedInAnnotation when it can't be."""
        from cxr.commands.dicom_results import to_bytes
        from cxr.data.deidentify import deidentify

        clean = deidentify(ds, self.secret)
        patient = str(clean.PatientID)
        relative = Path("images") / patient / f"{pseudonym(self.secret, instance.sop, 'I')}.dcm"
        write_bytes(self.folder / relative, to_bytes(clean))
        accession = str(ds.get("AccessionNumber", ""))
        row = {"sop_instance_uid": instance.sop, "patient_key": patient,
               "accession_key": pseudonym(self.secret, accession, "A") if accession else "",
               "view": str(ds.get("ViewPosition", "")).upper(), "path": relative.as_posix()}
        with self.lock:
            if self.mapping is not None:  # first: a row in the manifest always has its mapping
                self.mapping.add({"patient_key": patient, "PatientID": str(ds.get("PatientID", "")),
                                  "accession_key": row["accession_key"], "AccessionNumber": accession,
                                  "sop_instance_uid": instance.sop})
            self.manifest.add(row)
            self.pulled += 1

    def not_pulled(self, why):
        with self.lock:
            self.reasons[why] += 1

    def close(self):
        self.manifest.close()
        if self.mapping is not None:
            self.mapping.close()


def pull(source, output_dir, options=PullOptions()):
    """Pull what `options` asks for from `source` (AE@HOST:PORT or a DICOMweb URL) into `output_dir`; returns
    {"found", "pulled", "already", "skipped", "failed"} counts. UserError for bad options or a PACS that refuses."""
    from cxr.data.deidentify import BurnedInAnnotation
    from cxr.progress import progress

    node = parse_node(source, "--from")
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir {folder}: a file is there; give a folder")
    if not options.query and options.accessions is None:
        raise UserError("give what to pull: --query KEY=VALUE (e.g. Modality=DX) and/or --accessions FILE")
    if options.keep_mapping is not None and Path(options.keep_mapping).resolve().is_relative_to(folder.resolve()):
        raise UserError(f"--keep-mapping {options.keep_mapping}: keep the mapping outside --output-dir {folder}, so "
                        "that the folder can be shared without it")
    accessions = read_accessions(options.accessions) if options.accessions is not None else None
    found = find_instances(node, options.query, accessions, options.ae_title)
    instances = [i for i in found if i.radiograph]
    folder.mkdir(parents=True, exist_ok=True)
    done = read_manifest(folder)
    pulled = {r["sop_instance_uid"] for r in done}
    todo = queue.Queue()
    for instance in instances:
        if instance.sop not in pulled:
            todo.put(instance)
    left_out = len(found) - len(instances)
    print(f"{len(found)} instances match at {node}" + (f" ({left_out} not radiographs: left out)" if left_out else "")
          + f"; {len(instances) - todo.qsize()} already in {folder}/, {todo.qsize()} to pull", flush=True)
    cohort, bar, errors = Cohort(folder, options.keep_mapping, done), None, []
    failed = Counter()

    def work():
        """Fetch and add instances until none is left, on this thread's own association or session."""
        fetcher = Fetcher(node, options.ae_title)
        try:
            while True:
                try:
                    instance = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    cohort.add(instance, fetcher.fetch(instance))
                except BurnedInAnnotation as error:
                    cohort.not_pulled(str(error))
                except Exception as error:  # noqa: BLE001 - one instance that can't be had must not stop the rest
                    if isinstance(error, UserError):  # the PACS refused this thread's association: stop
                        errors.append(error)
                        return
                    why = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                    cohort.not_pulled(why)
                    with cohort.lock:
                        failed[why] += 1
                    fetcher.close()
                    fetcher = Fetcher(node, options.ae_title)  # a fresh association after a failure
                finally:
                    with cohort.lock:
                        bar.update(1)
        finally:
            fetcher.close()

    bar = progress(total=todo.qsize(), desc="Pulling", unit="instance")
    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, min(options.workers, todo.qsize())))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        bar.close()
        cohort.close()
    if errors:
        raise errors[0]
    for why, n in cohort.reasons.items():
        warn(f"{n} instance{'s' if n > 1 else ''} not pulled: {why}")
    not_pulled = sum(cohort.reasons.values())
    return {"found": len(found), "pulled": cohort.pulled, "already": len(pulled & {i.sop for i in instances}),
            "skipped": left_out + not_pulled - sum(failed.values()), "failed": sum(failed.values())}
