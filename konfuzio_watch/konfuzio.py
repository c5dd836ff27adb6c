"""A thin adapter over konfuzio-sdk's function-level API, with one long-lived session.

The SDK has sharp edges for a daemon (KONFUZIO_API.md): it reads host/token once at import,
opens ``konfuzio_sdk.log`` in the cwd, logs warnings on the root logger, and its upload helper
ignores the session's host. So: ``import_sdk`` imports it quietly with the environment set
from our config, and uploads are posted with the SDK's session to the SDK's own upload URL for
*our* host, in exactly the form ``upload_file_konfuzio_api`` sends, under a safe file name.
"""

from __future__ import annotations

import email.utils
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from .policy import Cause, Failure

if TYPE_CHECKING:
    from .project_catalog import ProjectCatalog

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A failed API call, classified for the retry policy (``failure``)."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure

    @property
    def status(self) -> int | None:
        return self.failure.status


@dataclass(frozen=True)
class UploadForm:
    project_id: int
    callback_url: str
    category_id: int | None = None
    dataset_status: int = 0


_sdk: dict[str, ModuleType] = {}


def import_sdk(host: str | None = None, token: str | None = None) -> dict[str, ModuleType]:
    """Import konfuzio_sdk once, without side effects on the cwd, sys.path or root logging."""
    if _sdk:
        return _sdk
    os.environ.setdefault("LOG_TO_FILE", "False")
    if host and "konfuzio_sdk" not in sys.modules:
        os.environ.setdefault("KONFUZIO_HOST", host)
    if token and "konfuzio_sdk" not in sys.modules:
        os.environ.setdefault("KONFUZIO_TOKEN", token)
    root = logging.getLogger()
    saved_level, placeholder = root.level, logging.NullHandler()
    root.addHandler(placeholder)  # so the SDK's basicConfig() installs nothing
    root.setLevel(logging.ERROR)  # and its "AI extras missing" warnings stay quiet
    saved_path = list(sys.path)
    try:
        import konfuzio_sdk.api as api
        import konfuzio_sdk.urls as urls
        import konfuzio_sdk.utils as utils
    finally:
        root.removeHandler(placeholder)
        root.setLevel(saved_level)
        sys.path[:] = saved_path
    _sdk.update(api=api, urls=urls, utils=utils)
    return _sdk


def sniff_file_type(fd: int) -> str:
    """The SDK's own verdict on a file's type ('PDF', 'IMAGE', 'OFFICE'), read through the open
    descriptor (``/proc/self/fd``: the file we opened, never a path someone swapped); raises
    ``UnsupportedFile`` for anything it would not take."""
    utils = import_sdk()["utils"]
    quiet = logging.getLogger("konfuzio_sdk.utils")  # it logs ERROR for every rejection
    if quiet.level != logging.CRITICAL:  # (setLevel empties every logger's level cache: not per file)
        quiet.setLevel(logging.CRITICAL)
    try:
        return utils.get_file_type_and_extension(f"/proc/self/fd/{fd}")[0]
    except NotImplementedError:
        raise UnsupportedFile(
            "unsupported file type: not a PDF, an image (PNG, JPEG, TIFF) or an office document"
        ) from None
    except OSError:
        raise
    except Exception as exc:  # a damaged zip/office file makes the sniffer itself fail
        raise UnsupportedFile(f"unrecognised or damaged file ({type(exc).__name__})") from None


class UnsupportedFile(Exception):
    pass


class KonfuzioClient:
    """The calls the daemon makes, on one long-lived ``konfuzio_session``."""

    def __init__(self, host: str, token: str, timeout_s: float = 120.0, pool_size: int = 10):
        sdk = import_sdk(host, token)
        self._api, self._urls = sdk["api"], sdk["urls"]
        self.host = host.rstrip("/")
        # Retries are ours (journaled, with backoff and a cap): the SDK's urllib3 retry would
        # block a worker for minutes and never retries a POST anyway.
        self.session = self._api.konfuzio_session(token=token, host=self.host, timeout=timeout_s, num_retries=0)
        adapter = self._api.TimeoutHTTPAdapter(
            timeout=timeout_s, max_retries=0, pool_connections=2, pool_maxsize=pool_size
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._read_environment_once()
        self._templates: dict[str, Any] = {}  # method -> the session's settings, prepared once (``_send``)

    def _read_environment_once(self) -> None:
        """Take the proxy and CA bundle the environment names for our host now, once: with
        ``trust_env`` requests looks up ``~/.netrc`` and the proxy variables at every request, a
        measurable part of the CPU per file. (A netrc entry for the host never did any good: it
        would replace the token header with Basic auth.)"""
        import requests

        self.session.proxies.update(requests.utils.get_environ_proxies(self.host))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle and self.session.verify is True:
            self.session.verify = bundle
        self.session.trust_env = False

    def close(self) -> None:
        self.session.close()

    def set_token(self, token: str) -> bool:
        """Use another API token from now on (a rotated credential); True if it changed."""
        header = f"Token {token}"
        if self.session.headers.get("Authorization") == header:
            return False
        self.session.headers["Authorization"] = header
        self._templates = {}
        return True

    def _send(
        self, method: str, url: str, *, data: Any = None, headers: dict[str, str] | None = None, stream: bool = False
    ) -> Any:
        """What ``session.request(method, url, ...)`` does, through the session's own ``send`` (its
        adapter, timeout, proxies, CA bundle, redirects, hooks and cookies), but with the session's
        headers merged once per method instead of at every call: requests' "prepared requests".
        ``Session.request`` merges every setting of the session into each request (headers, cookies,
        hooks, auth, the environment's), a measurable part of each call's CPU, with four calls per file
        (docs/performance.md). The headers change only with the token (``set_token``)."""
        template = self._templates.get(method)
        if template is None:
            import requests

            template = self._templates[method] = self.session.prepare_request(requests.Request(method, self.host))
        request = template.copy()
        request.prepare_url(url, None)
        if headers:
            request.headers.update(headers)
        if data is not None:
            request.prepare_body(data, None)
        if self.session.cookies:  # a server that sets cookies gets them back, as with Session.request
            request.prepare_cookies(self.session.cookies)
        return self.session.send(request, stream=stream)

    def upload(self, file: BinaryIO, file_name: str, form: UploadForm) -> dict[str, Any]:
        """POST the file (``sync=False``, with callback URL); returns the new document's details.

        The body is streamed from ``file`` (requests-toolbelt's MultipartEncoder), with the form
        fields and part label that ``upload_file_konfuzio_api`` sends; requests alone would hold the
        whole file, and a second copy for the multipart body, in memory."""
        from requests_toolbelt import MultipartEncoder

        url = self._urls.get_upload_document_url(self.host)
        fields: dict[str, Any] = {
            "data_file": (file_name, file, "multipart/form-data"),  # as the SDK labels it
            "project": str(form.project_id),
            "dataset_status": str(form.dataset_status),
            "sync": "False",
            "callback_url": form.callback_url,
        }
        if form.category_id is not None:
            fields["category"] = str(form.category_id)
        body = MultipartEncoder(fields=fields)
        return self._call(self._post_json, url, data=body, headers={"Content-Type": body.content_type}, is_post=True)

    # The reads below do what the SDK's get_document_details / get_document_bbox /
    # get_document_annotations do (the SDK's URL for our host, a GET on the SDK's session, the
    # body as JSON, ``next`` followed), but decode the body with orjson: the character boxes are
    # most of every result's bytes, and json's decoder was a large part of the CPU per file
    # (docs/performance.md). Same requests, same answers, same errors.

    def document(self, document_id: int) -> dict[str, Any]:
        return self._get_json(self._urls.get_document_details_url(document_id=document_id, host=self.host))

    def bbox(self, document_id: int) -> dict[str, Any]:
        return self._get_json(self._urls.get_document_bbox_url(document_id=document_id, host=self.host))

    def delete_document(self, document_id: int) -> None:
        """DELETE the document (as ``delete_file_konfuzio_api`` does, but to our host; the session's
        adapter raises for an error status)."""
        self._call(self.session.delete, self._urls.get_document_url(document_id, host=self.host))

    def project(self, project_id: int) -> dict[str, Any]:
        return self._call(self._api.get_project_details, project_id, session=self.session)

    def document_pages(self, project_id: int, page_size: int = 100) -> Iterator[list[dict[str, Any]]]:
        """The project's documents (meta only), newest first, one page per request: the caller
        stops as soon as it has seen what it looks for."""
        url: str | None = self._urls.get_documents_meta_url(project_id, limit=page_size, host=self.host)
        url = f"{url}&ordering=-id"
        while url:
            page = self._get_json(url)
            yield page.get("results", [])
            url = page.get("next")

    def _get_json(self, url: str) -> Any:
        return self._call(self._fetch_json, url)

    def _fetch_json(self, url: str) -> Any:
        return decode_json(self._send("GET", url))

    def _post_json(self, url: str, **kwargs: Any) -> Any:
        return decode_json(self._send("POST", url, **kwargs))

    def _call(self, fn: Any, *args: Any, is_post: bool = False, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # the SDK and requests raise a zoo; classify them all
            raise classify(exc, is_post=is_post) from exc

    # -- results beyond details and bbox -------------------------------------------------------

    def annotations(self, document_id: int) -> list[dict[str, Any]]:
        """Every annotation of the document, following ``next`` as the SDK's
        ``consume_paginated_api`` does: 1000 per page, fewer if the server caps the page size."""
        return self._call(
            self._all_results, self._urls.get_document_annotations_url(document_id=document_id, host=self.host)
        )

    def _all_results(self, url: str | None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while url:  # (a page without "results" raises here, inside _call: classified like any bad answer)
            page = self._fetch_json(url)
            found.extend(page["results"])
            url = page.get("next")
        return found

    def project_labels(self, project_id: int) -> list[dict[str, Any]]:
        return self._call(self._api.get_project_labels, project_id, session=self.session)

    def project_label_sets(self, project_id: int) -> list[dict[str, Any]]:
        """All of them: ``include_categories=True``, since a category's own label set (the one
        with its name, ``is_category``) holds most annotations; the SDK leaves those out by default."""
        return self._call(self._api.get_project_label_sets, project_id, include_categories=True, session=self.session)

    def project_categories(self, project_id: int) -> list[dict[str, Any]]:
        return self._call(self._api.get_project_categories, project_id, session=self.session)

    def project_catalog(self, project_id: int) -> ProjectCatalog:
        """The project's ``project_catalog.ProjectCatalog`` (three requests), for ``CatalogCache.catalog_for``."""
        from .project_catalog import ProjectCatalog

        return ProjectCatalog.from_api(
            project_id,
            self.project_labels(project_id),
            self.project_label_sets(project_id),
            self.project_categories(project_id),
        )

    def download_searchable_pdf(
        self, document_id: int, target: Path, *, replace: bool = False, chunk_size: int = 64 * 1024
    ) -> int:
        """Stream the searchable (OCR'd) PDF of ``GET /doc/show/<id>/`` into ``target``; its size.

        Written into a new hidden file next to ``target`` (``write_searchable_pdf``), fsynced, then
        given its name: an error leaves no partial file. ``target`` is never replaced unless
        ``replace`` (else ``FileExistsError``). Errors as ``write_searchable_pdf``'s.
        """
        from .files import write_file_no_clobber

        sizes = []
        write_file_no_clobber(
            target,
            lambda out: sizes.append(self.write_searchable_pdf(document_id, out, chunk_size)),
            may_replace=(lambda _folder: True) if replace else None,
        )
        return sizes[0]

    def write_searchable_pdf(self, document_id: int, out: BinaryIO, chunk_size: int = 64 * 1024) -> int:
        """Stream the searchable PDF into ``out``, chunk by chunk (a 250-page PDF never sits in
        memory), and check it (a PDF, as long as Content-Length said); its size.

        What ``download_file_konfuzio_api(id, ocr=True)`` fetches. API and transfer errors raise
        ``ApiError`` (before OCR is done the server answers 404: ``Cause.NOT_FOUND``, so do not read
        it as a deleted document); writing errors raise ``OSError``. The caller fsyncs.
        """
        import requests

        url = self._urls.get_document_ocr_file_url(document_id, host=self.host)
        response = self._call(self._send, "GET", url, stream=True)
        written = 0
        with response:
            head = b""
            try:
                for chunk in response.iter_content(chunk_size):
                    if len(head) < 1024:
                        head += chunk[: 1024 - len(head)]
                    out.write(chunk)
                    written += len(chunk)
            except requests.RequestException as exc:  # cut short, reset, timed out mid-body
                raise classify(exc) from exc
            self._check_pdf(head, written, response.headers, url)
        return written

    @staticmethod
    def _check_pdf(head: bytes, size: int, headers: Any, url: str) -> None:
        """A body that is not the whole PDF (a login page, a proxy's error page, a short read) is an
        error, never a result file."""
        expected = (headers.get("Content-Length") or "").strip()
        encoded = (headers.get("Content-Encoding") or "identity").strip().lower() != "identity"
        if expected.isdigit() and not encoded and int(expected) != size:  # (gzip: the length of the gzip)
            raise ApiError(Failure(Cause.TRANSIENT, f"got {size} of {expected} bytes from {url}"))
        if b"%PDF" not in head:  # the SDK's own test: junk before the signature is allowed
            kind = headers.get("Content-Type") or "no content type"
            raise ApiError(Failure(Cause.TRANSIENT, _short(f"not a PDF ({kind}, {size} bytes) from {url}")))


def decode_json(response: Any) -> Any:
    """A response's body as JSON: orjson, and json (via requests) for what orjson refuses
    (``NaN``, for one), so an answer that requests would read is read the same."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.json()


def classify(exc: BaseException, *, is_post: bool = False) -> ApiError:
    """Turn whatever the SDK or requests raised into one classified ``ApiError``."""
    import requests

    if isinstance(exc, requests.HTTPError):
        response = exc.response if exc.response is not None else getattr(exc.__cause__, "response", None)
        status = response.status_code if response is not None else _status_from_message(str(exc))
        message = _short(f"HTTP {status}: {exc}" if status else str(exc))
        return ApiError(
            Failure(
                _cause_of_status(status),
                message,
                status=status,
                retry_after_s=_retry_after(response.headers if response is not None else {}),
                # a gateway's 5xx (503 included) may come after it forwarded the upload
                maybe_received=is_post and status is not None and status >= 500,
            )
        )
    where = _where(exc)
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.ProxyError):
        return ApiError(Failure(Cause.UNAVAILABLE, f"cannot connect to {where}: {_cause_text(exc, 'timed out')}"))
    if isinstance(exc, requests.ConnectionError) and _never_connected(exc):
        return ApiError(Failure(Cause.UNAVAILABLE, f"cannot connect to {where}: {_cause_text(exc)}"))
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return ApiError(
            Failure(Cause.TRANSIENT, f"no answer from {where} in time (read timeout)", maybe_received=is_post)
        )
    if isinstance(exc, requests.RequestException):  # resets, a body cut short
        return ApiError(
            Failure(Cause.TRANSIENT, f"{where}: {_cause_text(exc, type(exc).__name__)}", maybe_received=is_post)
        )
    if isinstance(exc, ValueError):  # a body that is not JSON
        return ApiError(Failure(Cause.TRANSIENT, _short(f"unexpected response: {exc}"), maybe_received=is_post))
    return ApiError(Failure(Cause.INTERNAL, _short(f"{type(exc).__name__}: {exc}"), maybe_received=is_post))


def _cause_of_status(status: int | None) -> Cause:
    if status is None:
        return Cause.TRANSIENT
    if status == 429:
        return Cause.THROTTLED
    if status in (401, 403):
        return Cause.REJECTED
    if status == 404:
        return Cause.NOT_FOUND
    if status in (502, 503, 504):
        return Cause.UNAVAILABLE
    if status >= 500:
        return Cause.TRANSIENT
    return Cause.INVALID


def _where(exc: BaseException) -> str:
    """host:port of the request that failed (the URL's path may carry a callback token: left out)."""
    from urllib.parse import urlsplit

    request = getattr(exc, "request", None)
    url = getattr(request, "url", None) or ""
    parts = urlsplit(url)
    if not parts.hostname:
        return "the server"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _cause_text(exc: BaseException, default: str = "connection failed") -> str:
    """The root cause of a requests/urllib3 error in a few words: "connection refused",
    "name or service not known" - not the nested reprs urllib3 builds."""
    import re

    seen: BaseException | None = exc
    while seen is not None:
        errno_ = getattr(seen, "errno", None)
        if isinstance(errno_, int) and errno_ > 0:
            return os.strerror(errno_).lower()
        reason = getattr(seen, "reason", None)
        seen = (
            reason
            if isinstance(reason, BaseException)
            else (
                seen.__cause__
                or seen.__context__
                or (seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None)
            )
        )
    found = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", str(exc))
    if found:
        return found.group(1).strip().lower()
    return default


def _never_connected(exc: BaseException) -> bool:
    import urllib3

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, urllib3.exceptions.NewConnectionError):
            return True
        reason = getattr(seen, "reason", None)
        if isinstance(reason, urllib3.exceptions.NewConnectionError):
            return True
        seen = seen.__cause__ or (seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None)
    return False


def _status_from_message(message: str) -> int | None:
    head = message[:3]
    return int(head) if head.isdigit() else None


def _retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date); the policy caps it."""
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
