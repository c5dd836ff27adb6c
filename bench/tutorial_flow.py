"""Konfuzio's own async-upload tutorial ("Asynchronously Uploading and Processing Multiple Files
using Webhooks"), kept to its structure, as the baseline the daemon is compared with.

Run in a subprocess: the SDK reads KONFUZIO_HOST/KONFUZIO_TOKEN at import and writes ``data_<id>/``
into the cwd. Usage (the files are looked up in the cwd, as in the tutorial)::

    KONFUZIO_HOST=http://127.0.0.1:8000 KONFUZIO_TOKEN=T LOG_TO_FILE=False \\
        python tutorial_flow.py --project 1 a.pdf b.pdf ...

Differences from the tutorial, none of which changes its speed: the Flask app is served by
werkzeug's ``make_server`` (what ``run_simple`` runs, single-threaded like its default) on port 0
so that it can be shut down; the update threads are joined so that the flow ends; and the
timings are printed as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

T_PROCESS = time.time()

from flask import Flask, request  # noqa: E402
from konfuzio_sdk.data import Document, Project  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

T_IMPORTED = time.time()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="where the callback app listens")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="give up waiting for callbacks")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)

    t_start = time.time()
    # 2. Create a Project object
    project = Project(id_=args.project)
    t_project = time.time()

    # 3. Create a Flask application
    app = Flask(__name__)

    # 5. Data structures shared between the threads
    callback_data_dict: dict[str, dict] = {}
    data_lock = threading.Lock()
    updated_at: dict[str, float] = {}
    errors: list[str] = []

    # 6. The callback function
    @app.route("/", methods=["POST"])
    def callback():  # noqa: ANN202
        data = request.json
        file_name = data.get("data_file_name")
        with data_lock:
            if file_name is not None and file_name in callback_data_dict:
                callback_data_dict[file_name]["callback_data"] = data
                callback_data_dict[file_name]["callback_received"].set()
        return "", 200

    # 8. (first half) start the Flask application: run_simple("0.0.0.0", 5000, app) in a thread
    server = make_server(args.host, 0, app)
    server_thread = threading.Thread(target=server.serve_forever, name="tutorial-flask")
    server_thread.start()
    # 4. The callback URL (in the tutorial: the ngrok URL in front of port 5000)
    callback_url = f"http://{args.host}:{server.server_port}/"

    # 7. Send the files asynchronously; update each once its callback has been received
    def update_file(document: Document, file_name: str) -> None:
        print(f"Waiting for callback for {document}", file=sys.stderr)
        if not callback_data_dict[file_name]["callback_received"].wait(args.timeout_s):
            errors.append(f"{file_name}: no callback within {args.timeout_s} s")
            return
        print(f"Received callback for {document}", file=sys.stderr)
        # Once the callback is received we can update our Document with the OCR information
        document.update()
        assert document.ocr_ready
        with data_lock:
            updated_at[file_name] = time.time()
        print(f"Updated {document} information with OCR results", file=sys.stderr)

    update_threads: list[threading.Thread] = []
    uploads_done: list[float] = []

    def send_files(file_names: list[str]) -> None:
        for file_name in file_names:
            with data_lock:
                callback_data_dict[file_name] = {
                    "callback_received": threading.Event(),
                    "callback_data": None,
                    "document": None,
                }
            print(f"Sending {file_name} to Konfuzio servers...", file=sys.stderr)
            document = Document.from_file(file_name, project=project, sync=False, callback_url=callback_url)
            with data_lock:
                callback_data_dict[file_name]["document"] = document
        uploads_done.append(time.time())

        # Wait for callbacks
        for file_name in callback_data_dict:
            thread = threading.Thread(target=update_file, args=(callback_data_dict[file_name]["document"], file_name))
            update_threads.append(thread)
            thread.start()

    # 8. (second half) upload the files
    sender = threading.Thread(target=send_files, args=(args.files,), name="tutorial-send")
    sender.start()
    sender.join()
    for thread in update_threads:
        thread.join()
    t_end = time.time()
    server.shutdown()
    server_thread.join()

    print(
        json.dumps(
            {
                "process_start": T_PROCESS,
                "imported": T_IMPORTED,
                "start": t_start,
                "project_ready": t_project,
                "uploads_done": uploads_done[0] if uploads_done else None,
                "end": t_end,
                "updated": len(updated_at),
                "last_update": max(updated_at.values(), default=None),
                "errors": errors,
            }
        )
    )
    return 0 if not errors and len(updated_at) == len(args.files) else 1


if __name__ == "__main__":
    raise SystemExit(main())
