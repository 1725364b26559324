"""Share links people paste (Google Drive, Dropbox) rewritten to their direct-download form."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_DRIVE_HOSTS = {"drive.google.com", "docs.google.com"}
_DRIVE_FILE_PATH = re.compile(r"^/file/d/([A-Za-z0-9_-]+)")
_DROPBOX_HOSTS = {"www.dropbox.com", "dropbox.com"}


def direct_download(url: str) -> tuple[str, str | None]:
    """Return ``(url_to_fetch, note)``; ``note`` says what was rewritten, or is ``None``.

    - ``https://drive.google.com/file/d/<id>/view?...`` and ``.../open?id=<id>`` become
      ``https://drive.google.com/uc?export=download&id=<id>`` (with its ``resourcekey``, if any); a
      direct ``uc?export=download`` link is left as it is;
    - Dropbox links with ``dl=0`` (or none) get ``dl=1``.
    """
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return url, None
    if host in _DRIVE_HOSTS:
        file_id = _drive_file_id(parts.path, parts.query)
        given = dict(parse_qsl(parts.query))
        if file_id and not (parts.path == "/uc" and given.get("export") == "download"):  # a direct link stays
            # A file shared before 2017 needs its resource key to be read by anyone new to it.
            kept = [(key, given[key]) for key in ("resourcekey", "confirm") if given.get(key)]
            direct = f"https://drive.google.com/uc?{urlencode([('export', 'download'), ('id', file_id), *kept])}"
            if direct != url:
                return direct, "Google Drive share link rewritten to its direct-download form."
    if host in _DROPBOX_HOSTS:
        query = parse_qsl(parts.query, keep_blank_values=True)
        flags = dict(query)
        if flags.get("dl") != "1" and flags.get("raw") != "1":
            kept = [(k, v) for k, v in query if k != "dl"]
            direct = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([*kept, ("dl", "1")]), ""))
            return direct, "Dropbox share link rewritten to download the file (dl=1)."
    return url, None


def _drive_file_id(path: str, query: str) -> str | None:
    match = _DRIVE_FILE_PATH.match(path)
    if match:
        return match.group(1)
    if path in ("/open", "/uc"):
        file_id = dict(parse_qsl(query)).get("id")
        if file_id and re.fullmatch(r"[A-Za-z0-9_-]+", file_id):
            return file_id
    return None
