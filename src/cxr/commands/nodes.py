"""Where a PACS is, as `cxr listen --send-to` and `cxr pull --from` take it: a DIMSE node (AE@HOST:PORT) or a
DICOMweb service (http(s)://HOST:PORT/dicom-web), parsed once into a value that can store datasets.

DICOMweb goes through dicomweb-client (STOW-RS, QIDO-RS, WADO-RS). Its credentials come from the environment, not
the command line, where every user of the machine could read them in the process list: CXR_DICOMWEB_TOKEN (an
OAuth bearer token) or CXR_DICOMWEB_USER and CXR_DICOMWEB_PASSWORD (HTTP basic).
"""

from dataclasses import dataclass

from cxr.errors import UserError

TIMEOUT_S = 30  # ACSE, DIMSE and network timeouts, both as SCP and as SCU, and each HTTP request's
TOKEN_VARIABLE, USER_VARIABLE, PASSWORD_VARIABLE = "CXR_DICOMWEB_TOKEN", "CXR_DICOMWEB_USER", "CXR_DICOMWEB_PASSWORD"
# C-STORE statuses that mean stored: Success and the warnings (coercion, elements discarded, data set mismatch)
STORED = (0x0000, 0xB000, 0xB006, 0xB007)
CREDENTIALS_HINT = f"check the credentials in ${TOKEN_VARIABLE}, or ${USER_VARIABLE} and ${PASSWORD_VARIABLE}"


@dataclass(frozen=True)
class DimseNode:
    """A DICOM node reached by DIMSE: AE title, host and port."""
    ae_title: str
    host: str
    port: int

    def __str__(self):
        return f"{self.ae_title}@{self.host}:{self.port}"

    def associate(self, calling_ae_title, contexts, roles=()):
        """A pynetdicom association with this node as `calling_ae_title`, asking for `contexts` (each a SOP class
        UID, or (a SOP class UID, its transfer syntaxes)) and SCP/SCU `roles`, with TIMEOUT_S; check
        `is_established`."""
        from pynetdicom import AE, evt
        from pynetdicom.pdu import A_ASSOCIATE_RJ

        ae = AE(ae_title=calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        for context in contexts:
            ae.add_requested_context(*(context if isinstance(context, tuple) else (context,)))
        rejections = []
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, ext_neg=list(roles),
                             evt_handlers=[(evt.EVT_PDU_RECV, lambda event: rejections.append(
                                 isinstance(event.pdu, A_ASSOCIATE_RJ)))])
        # pynetdicom reports a rejection as an abort when the peer closes the connection right after its
        # A-ASSOCIATE-RJ, before the reject is handed on (1 in 10 on a loaded machine): the PDU says what it was
        assoc.is_rejected = assoc.is_rejected or (not assoc.is_established and any(rejections))
        return assoc

    def store(self, datasets, calling_ae_title):
        """C-STORE `datasets` in one association; None when every one was stored, else why not (one try)."""
        assoc = self.associate(calling_ae_title, sorted({str(ds.SOPClassUID) for ds in datasets}))
        if not assoc.is_established:
            return "the association was rejected or the PACS did not answer"
        try:
            statuses = [assoc.send_c_store(ds) for ds in datasets]
        finally:
            assoc.release()
        bad = [s for s in statuses if not s or s.Status not in STORED]
        if not bad:
            return None
        return "no answer to a C-STORE" if not bad[0] else f"C-STORE status 0x{bad[0].Status:04X}"


@dataclass(frozen=True)
class DicomWebService:
    """A DICOMweb service: its base URL (the one QIDO-RS, WADO-RS and STOW-RS paths start from)."""
    url: str

    def __str__(self):
        return self.url

    def client(self):
        """A dicomweb-client `DICOMwebClient` for this service, with the environment's credentials and no retries
        of its own (the callers retry, and say so)."""
        import os

        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        token, user = os.environ.get(TOKEN_VARIABLE), os.environ.get(USER_VARIABLE)
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        elif user:
            session.auth = (user, os.environ.get(PASSWORD_VARIABLE, ""))
        session.request = _with_timeout(session.request)
        client = DICOMwebClient(self.url, session=session)
        client.set_http_retry_params(retry=False)
        return client

    def store(self, datasets, calling_ae_title=None):
        """STOW-RS `datasets` in one request; None when every one was stored, else why not (one try)."""
        import requests

        try:
            answer = self.client().store_instances(list(datasets))
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            return f"STOW-RS answered HTTP {status}" + (f" ({CREDENTIALS_HINT})" if status in (401, 403) else "")
        except requests.RequestException as error:
            return f"the DICOMweb service did not answer ({type(error).__name__})"
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reason = failed[0].get("FailureReason")
            return f"STOW-RS stored {len(datasets) - len(failed)} of {len(datasets)}" + (
                f" (failure reason 0x{int(reason):04X})" if reason is not None else "")
        return None


def _with_timeout(request):
    """`requests.Session.request` with TIMEOUT_S unless a timeout is given: requests waits forever otherwise."""
    def timed(method, url, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT_S)
        return request(method, url, **kwargs)
    return timed


def parse_node(text, option):
    """'AE@HOST:PORT' -> DimseNode, 'http(s)://...' -> DicomWebService; UserError naming `option` otherwise."""
    if text.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        parts = urlsplit(text)
        if not parts.hostname or parts.query or parts.fragment or parts.username:
            raise UserError(f"{option} {text!r}: give a DICOMweb service as its base URL, e.g. "
                            "http://127.0.0.1:8042/dicom-web (credentials go in $CXR_DICOMWEB_TOKEN or "
                            "$CXR_DICOMWEB_USER and $CXR_DICOMWEB_PASSWORD, not in the URL)")
        return DicomWebService(text.rstrip("/"))
    ae, at, address = text.partition("@")
    host, colon, port = address.rpartition(":")
    if not (at and colon and ae and host and port.isdigit() and 0 < int(port) < 65536 and len(ae) <= 16):
        raise UserError(f"{option} {text!r}: give the PACS as AE@HOST:PORT (an AE title of at most 16 "
                        "characters), e.g. ORTHANC@127.0.0.1:4242, or a DICOMweb URL such as "
                        "http://127.0.0.1:8042/dicom-web")
    return DimseNode(ae, host.strip("[]"), int(port))
