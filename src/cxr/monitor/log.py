"""The prediction log: one row per answer of `cxr predict`, `serve` or `listen` with `--monitor-db DB`.

DB is a file path (SQLite, created on first use) or a SQLAlchemy URL such as ``postgresql://...`` (several
`cxr serve` replicas, one database). Rows carry no name, ID, date or file name: each image is a key, a salted
SHA-256 of its SOP Instance UID, the path given to `predict`, an `image_id` sent with an upload, or its pixels,
with the salt kept in the database itself so that `cxr monitor` hashes confirmed labels the same way.

Writing never delays or fails an answer: rows go through a bounded queue to a writer thread; a database that is
gone, full, locked or read-only costs the rows (counted in `failed`, one line on stderr per kind of error), and
the answers still go out.
"""

import functools
import hashlib
import queue
import secrets
import sys
import threading
from pathlib import Path

from cxr.errors import UserError

SCHEMA_VERSION = 1
QUEUE_ROWS = 10_000  # answers waiting for the writer; beyond it, rows are dropped (and counted), never the answer
BATCH_ROWS = 256
LOGGED_TAGS = {"modality": 16, "view": 16, "manufacturer": 64, "device_model": 64, "sex": 8}  # and their widths


@functools.cache
def tables():
    """(metadata, predictions, settings): the log's SQLAlchemy Core tables (schema SCHEMA_VERSION); SQLAlchemy is
    imported on first use, so commands without --monitor-db never load it."""
    from sqlalchemy import JSON, Boolean, Column, DateTime, Float, Integer, MetaData, String, Table

    metadata = MetaData()
    predictions = Table(
        "predictions", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("time", DateTime(timezone=True), nullable=False, index=True),
        Column("model_sha256", String(64), nullable=False, index=True),
        Column("command", String(16), nullable=False),
        Column("image_key", String(64), nullable=False, index=True),
        Column("label", String(400)),  # the class, or the findings called ("none": no finding)
        Column("probabilities", JSON, nullable=False),  # {class or finding: calibrated probability}
        Column("calls", JSON, nullable=False),  # [the classes or findings called]
        Column("population_score", Float),
        Column("in_distribution", Boolean),  # None: the model has no population check
        Column("width", Integer), Column("height", Integer), Column("format", String(16)),
        Column("modality", String(16)), Column("view", String(16)), Column("manufacturer", String(64)),
        Column("device_model", String(64)), Column("sex", String(8)), Column("age_band", String(16)),
        Column("warnings", JSON), Column("latency_ms", Float))
    settings = Table("cxr_monitor", metadata, Column("key", String(32), primary_key=True),
                     Column("value", String(200), nullable=False))
    return metadata, predictions, settings


def database_url(db):
    """A SQLAlchemy URL for `--monitor-db DB`: a URL as it is, a path as SQLite."""
    text = str(db)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def open_database(db):
    """(engine, salt) of the prediction log at `db`, its tables created or migrated to SCHEMA_VERSION on first use;
    UserError when it can't be opened or was written by a newer cxr."""
    from sqlalchemy import create_engine, event, insert, select, text
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    metadata, _, settings = tables()
    url = database_url(db)
    try:
        engine = create_engine(url, pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            @event.listens_for(engine, "connect")
            def _sqlite(connection, _):  # readers (cxr monitor) beside the writer; a locked file waits 5 s
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA busy_timeout=5000")
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":  # replicas starting together create the tables once
                connection.execute(text("SELECT pg_advisory_xact_lock(4907)"))
            metadata.create_all(connection)
            found = dict(connection.execute(select(settings.c.key, settings.c.value)).all())
        version = int(found.get("schema_version", 0))
        if version > SCHEMA_VERSION:
            raise UserError(f"{db}: a prediction log of schema {version}, written by a newer cxr (this one knows "
                            f"{SCHEMA_VERSION}); upgrade cxr")
        for key, value in (("schema_version", str(SCHEMA_VERSION)), ("salt", secrets.token_hex(16))):
            if key not in found:
                try:  # another process may create it first: then its value stands
                    with engine.begin() as connection:
                        connection.execute(insert(settings).values(key=key, value=value))
                except IntegrityError:
                    pass
        with engine.begin() as connection:
            salt = connection.execute(select(settings.c.value).where(settings.c.key == "salt")).scalar_one()
    except SQLAlchemyError as error:
        raise UserError(f"{db}: can't open the prediction log ({_first_line(error)}); give a writable file path or "
                        "a database URL such as postgresql://user@host/db") from None
    return engine, salt


def image_key(salt, kind, value):
    """The salted SHA-256 (32 hex digits) that names an image in the log: `kind` "uid", "path", "id" or
    "pixels"."""
    data = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return hashlib.sha256(f"{salt}:{kind}:".encode() + data).hexdigest()[:32]


class PredictionLog:
    """Rows written by a background thread (see the module docstring). `failed`: rows the database refused;
    `dropped`: rows the full queue turned away. `wait`: a batch command (`cxr predict` of a folder) waits for room
    in the queue rather than drop rows; a server never waits."""

    def __init__(self, db, command, wait=False):
        self.engine, self.salt = open_database(db)
        self.command, self.wait, self.failed, self.dropped = command, wait, 0, 0
        self._queue = queue.Queue(QUEUE_ROWS)
        self._errors = set()
        self._thread = threading.Thread(target=self._write, name="cxr-monitor-log", daemon=True)
        self._thread.start()

    def key(self, kind, value):
        return image_key(self.salt, kind, value)

    def record(self, row):
        """Queue one answer's row (`row`: the predictions table's columns but id, command and time, which is
        now if absent); blocks only where `wait`."""
        import datetime

        row = {"time": datetime.datetime.now(datetime.timezone.utc), "command": self.command} | row
        try:
            self._queue.put(row, block=self.wait)
        except queue.Full:
            self.dropped += 1

    @property
    def waiting(self):
        return self._queue.qsize()

    def close(self, timeout=10):
        """Write what is queued (for up to `timeout` seconds) and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)
        self.engine.dispose()

    def _write(self):
        from sqlalchemy import insert

        _, predictions, _ = tables()
        while True:
            rows = [self._queue.get()]
            while len(rows) < BATCH_ROWS and rows[-1] is not None:
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = rows[-1] is None
            rows = [r for r in rows if r is not None]
            if rows:
                try:
                    with self.engine.begin() as connection:
                        connection.execute(insert(predictions), rows)
                except Exception as error:  # noqa: BLE001 - SQLAlchemyError or not, the writer must go on
                    self.failed += len(rows)
                    reason = _first_line(error)
                    if type(error).__name__ not in self._errors:
                        self._errors.add(type(error).__name__)
                        print(f"cxr: warning: the prediction log lost {len(rows)} rows ({reason}); answers go on, "
                              "and lost rows are counted", file=sys.stderr, flush=True)
            if done:
                return


def _first_line(error):
    text = str(getattr(error, "orig", None) or error)
    return text.strip().splitlines()[0][:160] if text.strip() else type(error).__name__


def answer_row(model, probabilities, label, population, image=None):
    """The predictions row of one answer of `model` (a `SavedModel`), without its key, warnings and latency:
    (classes,) calibrated `probabilities`, its `label` (a class index, or a multi-label model's 0/1 calls),
    `population` (the population check's fields, None where there is no check) and, when known, the decoded
    `image` (a `data.decode.DecodedImage`: its size and mode)."""
    names = model.class_names
    calls = model.task.called(label)  # in the order of the model's outputs
    row = {"model_sha256": model.sha256, "label": model.task.label_text(label), "calls": calls,
           "probabilities": {c: round(float(v), 6) for c, v in zip(names, probabilities)},
           "population_score": population.get("population_score"), "in_distribution": population.get("in_distribution")}
    if image is not None:
        row |= {"width": image.width, "height": image.height, "format": image.mode}
    return row


INPUT_PROPERTIES = ("format", "resolution", "modality", "view", "manufacturer", "device_model", "sex", "age_band")


def resolution_band(width, height):
    """The octave of an image's longer side ("1024-2047" pixels), or None where its size is unknown."""
    if not width or not height:
        return None
    low = 1 << (max(int(width), int(height)).bit_length() - 1)
    return f"{low}-{2 * low - 1}"


def input_mix(row):
    """{property: category} of a logged row (or one made by `file_properties`): the input properties whose mix
    `cxr monitor` compares with validation's ("unknown" where the file does not say)."""
    values = dict(row) | {"resolution": resolution_band(row.get("width"), row.get("height"))}
    return {name: str(values.get(name) or "unknown") for name in INPUT_PROPERTIES}


def file_properties(path):
    """The input properties of an image file as a logged row has them, read from its header only."""
    from PIL import Image

    from cxr.data import dicom

    fields = header_fields(path)
    if fields:
        size = dicom.header_values(path, {"width": "Columns", "height": "Rows"})
        return fields | {"format": "DICOM", "width": int(size["width"] or 0), "height": int(size["height"] or 0)}
    try:
        with Image.open(path) as img:
            return {"format": img.mode, "width": img.width, "height": img.height}
    except OSError:
        return {}


def header_fields(source, also=None):
    """The DICOM header's input properties for the log (modality, view, manufacturer and model, sex, age band);
    {} for other files. `source`: a path or the file's bytes; `also`: {key: DICOM keyword} of more tags whose
    values to return, read in the same pass over the header."""
    from cxr.data import dicom
    from cxr.data.decode import is_dicom_file
    from cxr.evaluate.subgroups import age_band

    if not (dicom.is_dicom(source) if isinstance(source, (bytes, bytearray)) else is_dicom_file(source)):
        return {}
    tags = dicom.header_values(source, dicom.SUBGROUP_TAGS | {"modality": "Modality"} | (also or {}))
    return {key: (tags[key] or "")[:width] or None for key, width in LOGGED_TAGS.items()} | {
        "age_band": age_band(tags["age"])} | {key: tags[key] for key in also or {}}
