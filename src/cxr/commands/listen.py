"""`cxr listen`: a DICOM Storage SCP (pynetdicom) between a PACS and a `SavedModel`.

A PACS routes X-rays to cxr's AE title by C-STORE. Each radiograph (Modality CR, DX or DR, frontal) is written to
a spool folder before its C-STORE is acknowledged, then a worker thread predicts it (with the population check),
makes its structured report and Grad-CAM Secondary Capture (`dicom_results`) and sends both back to `--send-to`
(by C-STORE, or STOW-RS to a DICOMweb service: `nodes`), and/or writes them to `--output-dir`. A result that
can't be sent after a few tries is kept in `--output-dir`/unsent/ and sent again when the listener next starts;
a spooled image is deleted only once its result is stored somewhere, and the spool is worked through again at
start: a killed listener loses nothing.

What gets no result is still acknowledged as the standard says (Success: the SCP accepted the object) and the
reason logged: other modalities (a CT), lateral views, cxr's own results routed back to it. A dataset that
can't be decoded is refused with a failure status (0xC000, cannot understand). Logs name an image only by a
short hash of its SOP Instance UID and never carry patient names, IDs or dates.
"""

import hashlib
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cxr.commands.nodes import TIMEOUT_S, parse_node
from cxr.errors import UserError

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
MAX_QUEUED = 200  # images acknowledged but not yet answered; past this the SCP answers "out of resources"
SEND_TRIES = 3
SPOOL_TRIES = 3  # tries at answering a spooled image (one per start, or more) before it is moved to failed/
RETRY_WAIT_S = 2.0  # doubled after every failed try
# Bounds on what one peer can hold (docs/pacs.md, "Limits"): TIMEOUT_S's 30 s apply to each read, so a peer trickling a
# byte every 10 s would keep its association slot forever, and a message is buffered as it arrives
MAX_PDU_BYTES = 1 << 20  # one PDU: cxr asks for 16 kB PDUs; an association request with every context fits in 64 kB
PDU_SECONDS = 10  # from a PDU's first byte to its last
MAX_MESSAGE_BYTES = 256 << 20  # one DIMSE message: a 50 MP 16-bit image is 100 MB uncompressed
MESSAGE_SECONDS = 300  # from a message's first PDU to its last


def log(message):
    print(f"cxr listen: {message}", file=sys.stderr, flush=True)


def image_key(sop_instance_uid):
    """How logs and file names name an image: 12 hex digits of its SOP Instance UID's SHA-256."""
    return hashlib.sha256(str(sop_instance_uid).encode("ascii", "replace")).hexdigest()[:12]


class Listener:
    """The SCP, its spool and the worker that answers what it received.

    `model`: a loaded `SavedModel`; `send_to`: a `nodes.DimseNode`, a `nodes.DicomWebService` or None;
    `output_dir`: where results (when given), unsent results and the spool go.
    """

    def __init__(self, model, ae_title, send_to, output_dir, keep_results, max_associations=4):
        self.model, self.ae_title, self.send_to = model, ae_title, send_to
        self.output_dir, self.keep_results = Path(output_dir), keep_results
        self.spool, self.unsent = self.output_dir / ".spool", self.output_dir / "unsent"
        self.max_associations = max_associations
        self.jobs = queue.Queue()
        self.decoding = threading.Lock()
        self.server = None
        self.prediction_log = None  # a monitor.log.PredictionLog with --monitor-db
        self.metrics = None  # ListenMetrics with --metrics-port

    # --- receiving -----------------------------------------------------------------------------------------
    def handle_echo(self, event):
        return SUCCESS

    def handle_store(self, event):
        """Acknowledge one C-STORE: spool a radiograph for the worker, or say why there is no result. Whatever the
        dataset holds, the answer is a status (0xC000 for what can't be understood), never an exception."""
        try:
            status = self._store(event)
        except Exception as error:  # noqa: BLE001 - an attribute no check foresaw: refuse it, keep listening
            log(f"refused a dataset from {event.assoc.requestor.ae_title}: it can't be read ({type(error).__name__})")
            status = _status(CANNOT_UNDERSTAND, "the dataset can't be read")
        if self.metrics is not None:
            self.metrics.stores.labels(f"0x{getattr(status, 'Status', status):04X}").inc()
        return status

    def _store(self, event):
        from cxr.data.decode import MAX_PIXELS, RefusedImage, UnreadableImage, decode
        from cxr.data.dicom import LATERAL_VIEWS
        from cxr.commands.dicom_results import MANUFACTURER

        try:
            ds = event.dataset
            key = image_key(ds.get("SOPInstanceUID", ""))
        except Exception as error:  # noqa: BLE001 - a dataset pydicom can't parse
            log(f"refused a dataset from {event.assoc.requestor.ae_title}: not readable ({type(error).__name__})")
            return _status(CANNOT_UNDERSTAND, "the dataset can't be read")
        where = f"image {key} from {event.assoc.requestor.ae_title}"
        if str(ds.get("Manufacturer", "")) == MANUFACTURER:
            log(f"{where}: no result (a result cxr made; it is not analysed again)")
            return SUCCESS
        view = str(ds.get("ViewPosition", "")).upper()
        if view in LATERAL_VIEWS:
            log(f"{where}: no result (a lateral view, ViewPosition {view}: the model reads frontal X-rays)")
            return SUCCESS
        if self.jobs.qsize() >= MAX_QUEUED:
            log(f"{where}: refused for now, {MAX_QUEUED} images are waiting (the PACS may send it again later)")
            return _status(OUT_OF_RESOURCES, "too many images waiting; send again later")
        data = event.encoded_dataset()
        try:
            with self.decoding:  # one image decodes at a time, whatever the number of associations
                image = decode(data, self.model.img_size, MAX_PIXELS, name=where)
        except RefusedImage as error:
            log(f"{error}: no result")
            return SUCCESS
        except UnreadableImage as error:
            log(f"{error}: refused (C-STORE failure 0xC000)")
            return _status(CANNOT_UNDERSTAND, "cxr can't decode this image")
        from cxr.atomic import write_bytes

        spooled = self.spool / f"{time.time_ns()}-{key}.dcm"
        try:
            write_bytes(spooled, data)  # acknowledged only once it is on disk
        except OSError as error:
            log(f"{where}: refused for now, the spool {self.spool} can't be written ({error.strerror}); free some "
                "space (the PACS may send it again later)")
            return _status(OUT_OF_RESOURCES, "cxr can't store it now; send again later")
        self.jobs.put((spooled, image))
        return SUCCESS

    # --- answering -----------------------------------------------------------------------------------------
    def work(self):
        while True:
            spooled, image = self.jobs.get()
            try:
                self.answer(spooled, image)
            except Exception as error:  # noqa: BLE001 - one bad image must not stop the worker
                why = scrubbed(str(error).splitlines()[0][:200] if str(error) else "", spooled)
                self.failed(spooled, f"{type(error).__name__}: {why}")
                if self.metrics is not None:
                    self.metrics.failed.inc()

    def failed(self, spooled, why):
        """Count a failed try at answering `spooled` in its name; after SPOOL_TRIES tries (over any number of
        starts) move it to failed/ with the reason beside it, so that it stops failing at every start."""
        from cxr.atomic import write_bytes

        stem, _, tries = spooled.stem.partition(".try")
        tries = int(tries) + 1 if tries.isdigit() else 1
        try:
            if tries < SPOOL_TRIES:
                spooled.rename(spooled.with_name(f"{stem}.try{tries}.dcm"))
                log(f"{stem}: no result ({why}); try {tries} of {SPOOL_TRIES}: the received image stays in the "
                    "spool and is tried again when cxr listen next starts")
                return
            aside = self.output_dir / "failed" / f"{stem}.dcm"
            aside.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(aside.with_suffix(".txt"), f"no result after {tries} tries: {why}\n".encode())
            spooled.rename(aside)
            log(f"{stem}: no result after {tries} tries ({why}); moved to {aside.parent}/ with the reason; it is "
                "not tried again")
        except OSError as error:
            log(f"{stem}: no result ({why}), and the spool can't be updated ({error.strerror})")

    def answer(self, spooled, image=None):
        """Predict the spooled image, make its results, store them, then delete it from the spool."""
        import pydicom

        from cxr.commands import dicom_results
        from cxr.data.decode import MAX_PIXELS, decode, image_warnings
        from cxr.evaluate import gradcam
        from cxr.commands.predict import explained_classes, population_fields

        data = spooled.read_bytes()
        source = pydicom.dcmread(spooled)
        key = image_key(source.SOPInstanceUID)
        if image is None:
            image = decode(data, self.model.img_size, MAX_PIXELS, name=f"image {key}")
        started = time.perf_counter()
        raw, taps = self.model.raw_outputs(image.pixels[None], batch_size=1)
        probabilities, labels = self.model.calibrate(raw)
        population = population_fields(self.model.check_population(taps), 0)
        result = dicom_results.result_from_prediction(self.model, probabilities[0], labels[0], population)
        target = explained_classes(self.model, probabilities[0], labels[0])[0]
        heatmap = gradcam.heatmaps(self.model.keras_model, image.pixels[None], [target])[0]
        from cxr.data.dicom import read_dicom

        display, _ = read_dicom(data, f"image {key}", MAX_PIXELS)
        results = {"sr": dicom_results.structured_report(source, result),
                   "sc": dicom_results.secondary_capture(source, display, heatmap, result)}
        notes = image_warnings(image, self.model.img_size)
        flagged = {None: "population check unavailable", True: "like the training images",
                   False: "FLAGGED: unlike the training images"}[population["in_distribution"]]
        seconds = time.perf_counter() - started
        log(f"image {key}: {result.label} ({flagged}) in {seconds:.1f} s" + (f"; {'; '.join(notes)}" if notes else ""))
        if self.metrics is not None:
            self.metrics.answered(result.label, population["in_distribution"] is False, seconds)
        if self.prediction_log is not None:
            from cxr.monitor.log import answer_row, header_fields

            self.prediction_log.record(
                answer_row(self.model, probabilities[0], labels[0], population, image) | header_fields(data)
                | {"image_key": self.prediction_log.key("uid", source.SOPInstanceUID), "warnings": notes,
                   "latency_ms": 1000 * seconds})
        self.store(key, results)
        spooled.unlink()

    def store(self, key, results):
        """Write `results` ({kind: Dataset}) to --output-dir when asked, and send them to --send-to; what can't be
        sent is written to unsent/."""
        from cxr.atomic import write_bytes
        from cxr.commands.dicom_results import to_bytes

        if self.keep_results:
            for kind, ds in results.items():
                write_bytes(self.output_dir / f"{kind}-{key}.dcm", to_bytes(ds))
        if self.send_to is None:
            return
        failure = self.send(list(results.values()))
        if self.metrics is not None:
            self.metrics.results.labels("sent" if failure is None else "kept unsent").inc(len(results))
        if failure is None:
            log(f"image {key}: structured report and overlay stored at {self.send_to}")
            return
        for kind, ds in results.items():
            write_bytes(self.unsent / f"{kind}-{key}.dcm", to_bytes(ds))
        log(f"image {key}: could not send the results to {self.send_to} after {SEND_TRIES} tries ({failure}); kept "
            f"in {self.unsent}/, sent again when cxr listen next starts (or send them with any DICOM sender)")

    def send(self, datasets):
        """Store `datasets` at --send-to (C-STORE, or STOW-RS for a DICOMweb URL), up to SEND_TRIES times; None
        when every one was stored, else why not."""
        wait, failure = RETRY_WAIT_S, None
        for attempt in range(SEND_TRIES):
            if attempt:
                time.sleep(wait)
                wait *= 2
            failure = self.send_to.store(datasets, self.ae_title)
            if failure is None:
                return None
        return failure

    def resend_unsent(self):
        """Send the results kept in unsent/ by an earlier run; those sent are deleted."""
        import pydicom

        files = finished(self.unsent)
        if not files or self.send_to is None:
            return
        if self.send([pydicom.dcmread(f) for f in files]) is None:
            for f in files:
                f.unlink()
            log(f"sent {len(files)} results kept from an earlier run to {self.send_to}")
        else:
            log(f"{len(files)} results in {self.unsent}/ still can't be sent to {self.send_to}")

    def count_association(self, event):
        if self.metrics is not None:
            self.metrics.associations.labels(event.event.name.removeprefix("EVT_").lower()).inc()

    # --- running -------------------------------------------------------------------------------------------
    def start(self, host, port):
        """Start the worker and the SCP (in the background); returns the server."""
        from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

        from cxr.data.dicom import DECODED_AS_INSTALLED
        from pynetdicom.sop_class import Verification

        for spooled in finished(self.spool):
            self.jobs.put((spooled, None))  # acknowledged by an earlier run, not yet answered
        threading.Thread(target=self.work, name="cxr-listen-worker", daemon=True).start()
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        # a connection's association request must come within PDU_SECONDS: pynetdicom holds the association slot of
        # a connection cut off before its request for as long as this
        ae.acse_timeout = PDU_SECONDS
        ae.require_called_aet = True
        # every storage class, so that a CT is answered with a reason rather than a rejected association; in the
        # uncompressed transfer syntaxes and every compressed one cxr decodes
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, [*DEFAULT_TRANSFER_SYNTAXES, *DECODED_AS_INSTALLED])
        ae.add_supported_context(Verification)
        from pynetdicom.transport import AssociationSocket

        AssociationSocket.recv = bounded_recv  # every association of this process, as SCP and as SCU
        limits = MessageLimits()
        handlers = [(evt.EVT_C_ECHO, self.handle_echo), (evt.EVT_C_STORE, self.handle_store),
                    (evt.EVT_ACCEPTED, self.count_association), (evt.EVT_REJECTED, self.count_association),
                    (evt.EVT_DATA_RECV, limits.data), (evt.EVT_DIMSE_RECV, limits.message),
                    (evt.EVT_RELEASED, limits.closed), (evt.EVT_ABORTED, limits.closed),
                    (evt.EVT_CONN_CLOSE, limits.closed)]
        try:
            self.server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as error:
            raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port or --host") from None
        return self.server


def bounded_recv(self, nr_bytes):
    """pynetdicom's `AssociationSocket.recv` with the listener's limits: a PDU longer than MAX_PDU_BYTES, or one
    whose bytes take more than PDU_SECONDS from first to last, ends the connection (pynetdicom then aborts the
    association) instead of being buffered or holding its slot."""
    if nr_bytes > MAX_PDU_BYTES:
        raise OSError(f"a PDU of {nr_bytes} bytes, more than the {MAX_PDU_BYTES} cxr listen accepts")
    received, first, timeout = bytearray(), None, self.socket.gettimeout()
    try:
        while len(received) < nr_bytes:
            if first is not None:  # the rest of the PDU must come before its deadline, however it trickles
                left = PDU_SECONDS - (time.monotonic() - first)
                if left <= 0:
                    raise OSError(f"a PDU took more than {PDU_SECONDS} s to arrive")
                self.socket.settimeout(left if timeout is None else min(left, timeout))
            chunk = self.socket.recv(min(4096, nr_bytes - len(received)))
            if not chunk:
                return received
            first = time.monotonic() if first is None else first
            received.extend(chunk)
        return received
    finally:
        self.socket.settimeout(timeout)


class MessageLimits:
    """Abort an association whose DIMSE message in progress grows past MAX_MESSAGE_BYTES or takes longer than
    MESSAGE_SECONDS (pynetdicom's EVT_DATA_RECV comes with every PDU, EVT_DIMSE_RECV with every whole message)."""

    def __init__(self):
        self.progress = {}  # association -> (bytes of the message in progress, when it started)

    def data(self, event):
        size, started = self.progress.get(event.assoc, (0, time.monotonic()))
        size += len(event.data)
        self.progress[event.assoc] = (size, started)
        if size > MAX_MESSAGE_BYTES or time.monotonic() - started > MESSAGE_SECONDS:
            why = (f"a message of more than {MAX_MESSAGE_BYTES >> 20} MB" if size > MAX_MESSAGE_BYTES
                   else f"a message still arriving after {MESSAGE_SECONDS} s")
            log(f"aborted the association from {event.assoc.requestor.ae_title}: {why}")
            self.progress.pop(event.assoc, None)
            event.assoc.abort()

    def message(self, event):
        self.progress.pop(event.assoc, None)

    def closed(self, event):
        self.progress.pop(event.assoc, None)


def without_traceback(record):
    """A logging filter: the record as its one-line message, without the exception's traceback."""
    record.exc_info, record.exc_text = None, None
    return True


def finished(folder):
    """The DICOM files in `folder` that were written completely, oldest first: the atomic writer's temporary
    files (".NAME.partial.dcm", left by a kill during a write) are not results or images, and are removed."""
    if not folder.is_dir():
        return []
    for leftover in folder.glob(".*.partial.dcm"):
        leftover.unlink(missing_ok=True)
    return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("."))


def scrubbed(message, spooled):
    """`message` with the spooled image's patient names, IDs and dates (and its study's) blanked out: a library's
    error may quote them, and the log must not."""
    import pydicom

    try:
        header = pydicom.dcmread(spooled, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - nothing to quote if it can't be read
        return message
    for element in header:
        if element.VR in ("PN", "DA", "DT", "TM", "LO", "SH") and str(element.value).strip():
            for part in {str(element.value)} | set(str(element.value).split("^")) - {""}:
                if len(part) > 2:
                    message = message.replace(part, "<withheld>")
    return message


def _status(code, comment):
    from pydicom.dataset import Dataset

    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class ListenMetrics:
    """`cxr listen --metrics-port`'s Prometheus metrics, served on that port (same host) by prometheus-client."""

    def __init__(self, listener):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.associations = Counter("cxr_listen_associations", "associations requested by peers, by result",
                                    ["result"], registry=registry)
        self.stores = Counter("cxr_listen_stores", "C-STORE requests by the status answered (0x0000: success)",
                              ["status"], registry=registry)
        self.images = Counter("cxr_listen_images", "X-rays answered with a result", registry=registry)
        self.calls = Counter("cxr_listen_calls", "X-rays by the class or findings called", ["label"],
                             registry=registry)
        self.flagged = Counter("cxr_listen_images_flagged", "X-rays the population check flagged as unlike the "
                                                            "training images", registry=registry)
        self.failed = Counter("cxr_listen_answers_failed", "tries at answering a received X-ray that failed",
                              registry=registry)
        self.latency = Histogram("cxr_listen_answer_seconds", "time to predict and make an X-ray's results",
                                 registry=registry, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.results = Counter("cxr_listen_results", "result objects (SR, Secondary Capture) sent to --send-to, or "
                                                     "kept unsent after every try", ["outcome"], registry=registry)
        for outcome in ("sent", "kept unsent"):  # series at 0 from the start, so that rates have a start
            self.results.labels(outcome)
        self.stores.labels(f"0x{SUCCESS:04X}")
        self.associations.labels("accepted")
        Gauge("cxr_listen_queue", "X-rays acknowledged and waiting to be answered",
              registry=registry).set_function(listener.jobs.qsize)
        Gauge("cxr_listen_unsent", "result files in unsent/, waiting for the next start",
              registry=registry).set_function(lambda: sum(not p.name.startswith(".")  # not one being written
                                                          for p in listener.unsent.glob("*.dcm")))
        Gauge("cxr_monitor_rows_failed", "prediction log rows the database refused or the full queue dropped",
              registry=registry).set_function(lambda: 0 if listener.prediction_log is None else
                                              listener.prediction_log.failed + listener.prediction_log.dropped)

    def answered(self, label, flagged, seconds):
        self.images.inc()
        self.calls.labels(label).inc()
        self.latency.observe(seconds)
        if flagged:
            self.flagged.inc()

    def serve(self, host, port):
        from prometheus_client import start_http_server

        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise UserError(f"--metrics-port {port}: cannot listen on {host}:{port} ({error.strerror}); pick "
                            "another port") from None


@dataclass(frozen=True)
class Node:
    """Where `cxr listen` answers: its address, AE title, how many associations it serves at once and the port
    of its Prometheus metrics (None: none)."""
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "CXR"
    max_associations: int = 4
    metrics_port: int = None


def listen(model_path, send_to=None, output_dir=None, node=Node(), precision="auto", monitor_db=None, codes=None):
    """Run `cxr listen` as `node` until interrupted, coding findings with the model's codes and those of the
    `codes` CSV (`data.vocabulary.read_codes`). UserError for bad options, an unusable model or a port in use."""
    from cxr.bundle.saved_model import SavedModel
    from cxr.data.vocabulary import read_codes, site_codes, uncoded_warning
    from cxr.errors import warn

    host, port, ae_title, max_associations = node.host, node.port, node.ae_title, node.max_associations
    if send_to is None and output_dir is None:
        raise UserError("give --send-to AE@HOST:PORT or a DICOMweb URL (the PACS that stores the results), "
                        "--output-dir DIR, or both")
    if not 0 < len(ae_title) <= 16 or not ae_title.isascii() or "\\" in ae_title:
        raise UserError(f"--ae-title {ae_title!r}: an AE title is 1 to 16 ASCII characters, without backslashes")
    destination = parse_node(send_to, "--send-to") if send_to else None
    own = read_codes(codes) if codes is not None else {}
    model = SavedModel.load(model_path, precision)
    matched, strangers = site_codes(model.class_names, own)
    if strangers:
        raise UserError(f"--codes {codes}: {', '.join(strangers)} is not a class of the model "
                        f"({', '.join(model.class_names)}); give codes for its classes")
    model.codes = model.codes | matched
    if uncoded := uncoded_warning(model.class_names, model.codes):
        warn(uncoded)
    if model.population is None:
        warn(model.population_note)
    pynetdicom_log = logging.getLogger("pynetdicom")
    pynetdicom_log.setLevel(logging.WARNING)  # its debug logs print datasets, patient data included
    one_line = logging.StreamHandler(sys.stderr)
    one_line.setFormatter(logging.Formatter("cxr listen: pynetdicom: %(message)s"))
    one_line.addFilter(without_traceback)  # a peer cut off by a limit is one line, not a traceback
    pynetdicom_log.addHandler(one_line)
    pynetdicom_log.propagate = False
    folder = Path(output_dir) if output_dir else Path("cxr-listen")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir {folder}: a file is there; give a folder")
    model.predictor()
    model.keras_model  # Grad-CAM's, loaded now rather than by the first image
    listener = Listener(model, ae_title, destination, folder, keep_results=output_dir is not None,
                        max_associations=max_associations)
    if monitor_db is not None:
        from cxr.monitor.log import PredictionLog

        listener.prediction_log = PredictionLog(monitor_db, "listen")
    if node.metrics_port is not None:
        listener.metrics = ListenMetrics(listener)
        listener.metrics.serve(host, node.metrics_port)
    listener.resend_unsent()
    server = listener.start(host, port)
    where = [f"sending results to {destination}"] if destination else []
    where += [f"writing them to {folder}/"] if output_dir else [f"keeping unsent results in {folder}/unsent/"]
    log(f"ready: AE title {ae_title} on {host}:{port}, {', '.join(where)} (model {model_path}, {model.engine})")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping; images not yet answered stay in the spool for the next start")
    finally:
        server.shutdown()
        if listener.prediction_log is not None:
            listener.prediction_log.close()
