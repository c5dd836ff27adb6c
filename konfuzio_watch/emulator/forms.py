"""Validation of the upload form, with Django REST framework's error bodies."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from werkzeug.datastructures import FileStorage

from konfuzio_watch.emulator.blobs import Blob, BlobStore
from konfuzio_watch.emulator.content import FileFacts
from konfuzio_watch.emulator.documents import NewDocument

DATASET_STATUSES = (0, 1, 2, 3, 4)
_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f"}

# Django's URLValidator (schemes limited to http/https): a domain needs a TLD unless it is
# "localhost", so "http://receiver:8080/cb" (a bare container name) is rejected like the real API does.
_IPV4 = r"(?:0|25[0-5]|2[0-4]\d|1\d?\d?|[1-9]\d?)(?:\.(?:0|25[0-5]|2[0-4]\d|1\d?\d?|[1-9]\d?)){3}"
_HOSTNAME = r"[a-z\u00a1-\uffff0-9](?:[a-z\u00a1-\uffff0-9-]{0,61}[a-z\u00a1-\uffff0-9])?"
_DOMAIN = r"(?:\.(?!-)[a-z\u00a1-\uffff0-9-]{1,63}(?<!-))*"
_TLD = r"\.(?!-)(?:[a-z\u00a1-\uffff-]{2,63}|xn--[a-z0-9]{1,59})(?<!-)\.?"
_URL = re.compile(
    r"^(?:https?)://"
    r"(?:[^\s:@/]+(?::[^\s:@/]*)?@)?"
    rf"(?:(?P<ipv4>{_IPV4})|\[(?P<ipv6>[0-9a-f:.]+)\]|{_HOSTNAME}{_DOMAIN}{_TLD}|localhost)"
    r"(?::(?P<port>\d{1,5}))?"
    r"(?:[/?#]\S*)?\Z",
    re.IGNORECASE,
)
URL_MAX_LENGTH = 2048

PK_TYPE_ERROR = "Incorrect type. Expected pk value, received str."


@dataclass
class UploadForm:
    """A valid upload: the document to store and whether to process synchronously."""

    document: NewDocument
    is_sync: bool


def is_valid_url(url: str) -> bool:
    """Django URLValidator semantics for http/https URLs."""
    if len(url) > URL_MAX_LENGTH:
        return False
    match = _URL.match(url)
    if match is None:
        return False
    if match["port"] and not 0 < int(match["port"]) <= 65535:
        return False
    if match["ipv6"]:
        try:
            ipaddress.IPv6Address(match["ipv6"])
        except ValueError:
            return False
    return True


def parse_upload(
    form: Mapping[str, str], files: Mapping[str, FileStorage], project_ids: Collection[int], blobs: BlobStore
) -> tuple[UploadForm | None, dict[str, list[str]]]:
    """Validate the multipart upload; return (form, {}) or (None, DRF-style errors).

    The file is copied into ``blobs`` chunk by chunk (never read whole into memory).
    """
    errors: dict[str, list[str]] = {}
    stored, name = _data_file(files, errors, blobs)
    project = _project(form.get("project"), project_ids, errors)
    dataset_status = _dataset_status(form.get("dataset_status"), errors)
    category = _optional_int(form, "category", errors, PK_TYPE_ERROR)
    callback_url = _callback_url(form.get("callback_url"), errors)
    callback_status_code = _optional_int(form, "callback_status_code", errors)
    is_sync = _boolean(form, "sync", errors)
    if errors or stored is None:
        blobs.discard(stored[0] if stored else None)
        return None, errors
    original, facts = stored
    document = NewDocument(
        project=project,
        data_file_name=name,
        original=original,
        facts=facts,
        dataset_status=dataset_status,
        category=category,
        callback_url=callback_url,
        callback_status_code=callback_status_code,
        assignee=form.get("assignee") or None,
    )
    return UploadForm(document=document, is_sync=is_sync), {}


def _data_file(
    files: Mapping[str, FileStorage], errors: dict, blobs: BlobStore
) -> tuple[tuple[Blob, FileFacts] | None, str]:
    upload = files.get("data_file")
    if upload is None or not upload.filename:
        errors["data_file"] = ["No file was submitted."]
        return None, ""
    stored = blobs.put(upload.stream)
    if stored[1].size == 0:
        errors["data_file"] = ["The submitted file is empty."]
    return stored, upload.filename


def _project(raw: str | None, project_ids: Collection[int], errors: dict) -> int:
    if raw is None or raw == "":
        errors["project"] = ["This field is required."]
        return 0
    try:
        project = int(raw)
    except ValueError:
        errors["project"] = [PK_TYPE_ERROR]
        return 0
    if project not in project_ids:
        errors["project"] = [f'Invalid pk "{raw}" - object does not exist.']
    return project


def _dataset_status(raw: str | None, errors: dict) -> int:
    if raw is None or raw == "":
        return 0
    if raw.strip().lstrip("-").isdigit() and int(raw) in DATASET_STATUSES:
        return int(raw)
    errors["dataset_status"] = [f'"{raw}" is not a valid choice.']
    return 0


def _optional_int(
    form: Mapping[str, str], key: str, errors: dict, message: str = "A valid integer is required."
) -> int | None:
    raw = form.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        errors[key] = [message]
        return None


def _callback_url(raw: str | None, errors: dict) -> str | None:
    raw = (raw or "").strip()  # DRF trims whitespace
    if not raw:
        return None
    if not is_valid_url(raw):
        errors["callback_url"] = ["Enter a valid URL."]
    return raw


def _boolean(form: Mapping[str, str], key: str, errors: dict) -> bool:
    raw = form.get(key)
    if raw is None or raw == "":
        return False
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    errors[key] = ["Must be a valid boolean."]
    return False
