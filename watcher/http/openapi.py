"""The OpenAPI 3.1 document of the watcher's HTTP API, served at ``/openapi.json``.

Written by hand, beside the routes of :mod:`watcher.http.app`; the tests check that every route
is documented and that real responses validate against the schemas below. It holds no logic.
"""

from __future__ import annotations

import copy
from typing import Any

from watcher import __version__
from watcher.models import Kind, State

_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_UNAUTHORIZED = _error("Missing or wrong bearer token.")
_BAD_ID = _error("The id is not a well-formed project id.")
_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_ID_PARAMETER = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The Magic Hour project id.",
    "schema": {"type": "string", "pattern": _ID_PATTERN},
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "properties": {
            "error": {"type": "string", "description": "A stable code, e.g. invalid_id."},
            "message": {"type": "string", "description": "What went wrong, for a person."},
        },
    },
    "Output": {
        "type": "object",
        "required": [
            "index",
            "path",
            "state",
            "bytes",
            "bytes_received",
            "sha256",
            "expires_at",
            "saved_at",
        ],
        "properties": {
            "index": {"type": "integer", "minimum": 0},
            "path": {"type": "string", "description": "Relative to WATCHER_DOWNLOAD_DIR."},
            "state": {"type": "string", "enum": ["pending", "verified", "saved"]},
            "bytes": {
                "type": ["integer", "null"],
                "description": "The verified size; null until the whole file is checked.",
            },
            "bytes_received": {
                "type": ["integer", "null"],
                "minimum": 0,
                "description": "Bytes on disk so far (the size of the file being written); "
                "equals bytes once saved.",
            },
            "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
            "expires_at": _NULLABLE_TIME,
            "saved_at": _NULLABLE_TIME,
        },
    },
    "Project": {
        "type": "object",
        "required": [
            "id",
            "kind",
            "state",
            "remote_status",
            "delete_after_download",
            "polls",
            "tracked_at",
            "updated_at",
            "terminal_at",
            "finished_at",
            "next_due_at",
            "error",
            "failure",
            "outputs",
        ],
        "properties": {
            "id": {"type": "string"},
            "kind": {"type": "string", "enum": [k.value for k in Kind]},
            "state": {"type": "string", "enum": [s.value for s in State]},
            "remote_status": {
                "type": ["string", "null"],
                "enum": ["draft", "queued", "rendering", "complete", "error", "canceled", None],
            },
            "delete_after_download": {"type": "boolean"},
            "polls": {"type": "integer", "minimum": 0},
            "tracked_at": _NULLABLE_TIME,
            "updated_at": _NULLABLE_TIME,
            "terminal_at": _NULLABLE_TIME,
            "finished_at": _NULLABLE_TIME,
            "next_due_at": {
                **_NULLABLE_TIME,
                "description": "When the watcher looks at it next; null once final.",
            },
            "error": {
                "type": ["object", "null"],
                "description": "The API's error of a project that ended in status error.",
                "properties": {
                    "code": {"type": ["string", "null"]},
                    "message": {"type": ["string", "null"]},
                },
            },
            "failure": {
                "type": ["string", "null"],
                "description": "Why the watcher gave up, or the last transient fault.",
            },
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Output"}},
        },
    },
    "ProjectPage": {
        "type": "object",
        "required": ["projects", "next_cursor", "counts"],
        "properties": {
            "projects": {"type": "array", "items": {"$ref": "#/components/schemas/Project"}},
            "next_cursor": {
                "type": ["string", "null"],
                "description": "Pass as `cursor` for the next page; null on the last page.",
            },
            "counts": {
                "type": "object",
                "description": "Tracked projects by state, over the whole store.",
                "additionalProperties": {"type": "integer"},
            },
        },
    },
    "TrackRequest": {
        "type": "object",
        "required": ["id", "kind"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "pattern": _ID_PATTERN},
            "kind": {"type": "string", "enum": [k.value for k in Kind]},
            "delete_after_download": {
                "type": "boolean",
                "description": "Default: WATCHER_DELETE_AFTER_DOWNLOAD.",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "checks", "problems", "warnings"],
        "properties": {
            "ready": {"type": "boolean"},
            "checks": {
                "type": "object",
                "required": ["store", "api_credentials", "api_payment", "shutting_down"],
                "properties": {
                    "store": {"enum": ["ok", "unreachable"]},
                    "api_credentials": {"enum": ["ok", "refused"]},
                    "api_payment": {"enum": ["ok", "required"]},
                    "shutting_down": {"type": "boolean"},
                },
            },
            "problems": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Why the watcher is not ready (503); empty when ready.",
            },
            "warnings": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Trouble that does not make it unready, e.g. a refused API token.",
            },
        },
    },
    "WebhookEvent": {
        "type": "object",
        "required": ["type", "payload"],
        "description": "A Magic Hour webhook event, e.g. image.completed or video.errored.",
        "properties": {
            "type": {"type": "string", "examples": ["image.completed", "video.errored"]},
            "payload": {
                "type": "object",
                "required": ["id"],
                "properties": {"id": {"type": "string"}},
                "description": "The project object, as GET /v1/{kind}-projects/{id} returns it.",
            },
        },
    },
    "WebhookAnswer": {
        "type": "object",
        "required": ["action", "note"],
        "properties": {
            "action": {"enum": ["expedited", "tracked", "ignored"]},
            "note": {"type": ["string", "null"]},
        },
    },
}

_PROJECT_REF = {"$ref": "#/components/schemas/Project"}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]

_PATHS: dict[str, Any] = {
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: the watcher's event loop answers.",
            "tags": ["health"],
            "responses": {"200": _json("Alive.", {"$ref": "#/components/schemas/Health"})},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: store reachable and not shutting down.",
            "description": (
                "A token or account the Magic Hour API refuses (401, 402) shows in `checks` and "
                "`warnings` but keeps the answer 200: webhooks and the control API still work."
            ),
            "tags": ["health"],
            "responses": {
                "200": _json("Ready.", {"$ref": "#/components/schemas/Readiness"}),
                "503": _json("Not ready.", {"$ref": "#/components/schemas/Readiness"}),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format).",
            "tags": ["health"],
            "responses": {
                "200": {
                    "description": "Every metric of the watcher.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "tags": ["meta"],
            "responses": {"200": _json("The OpenAPI document.", {"type": "object"})},
        }
    },
    "/v1/projects": {
        "get": {
            "operationId": "listProjects",
            "summary": "Tracked projects in id order, a page at a time.",
            "tags": ["projects"],
            "security": _SECURED,
            "parameters": [
                {
                    "name": "status",
                    "in": "query",
                    "description": "Only projects in this watcher state.",
                    "schema": {"type": "string", "enum": [s.value for s in State]},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
                {
                    "name": "cursor",
                    "in": "query",
                    "description": "The `next_cursor` of the previous page (a project id).",
                    "schema": {"type": "string", "pattern": _ID_PATTERN},
                },
            ],
            "responses": {
                "200": _json("A page.", {"$ref": "#/components/schemas/ProjectPage"}),
                "400": _error("An unknown parameter, status, or a bad limit or cursor."),
                "401": _UNAUTHORIZED,
            },
        },
        "post": {
            "operationId": "trackProject",
            "summary": "Track a project until it is final.",
            "tags": ["projects"],
            "security": _SECURED,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/TrackRequest"}}
                },
            },
            "responses": {
                "201": _json("Now tracked (new, or a not_found project again).", _PROJECT_REF),
                "200": _json("Was already tracked; unchanged.", _PROJECT_REF),
                "400": _error("Bad JSON, an unknown field, a bad id or an unknown kind."),
                "401": _UNAUTHORIZED,
                "403": _error("Sent from another site's web page (Origin, Sec-Fetch-Site)."),
                "409": _error("Already tracked as another kind."),
                "413": _error("The body is larger than 64 KiB."),
                "415": _error("The body is not declared application/json."),
            },
        },
    },
    "/v1/projects/{id}": {
        "parameters": [_ID_PARAMETER],
        "get": {
            "operationId": "getProject",
            "summary": "One tracked project and its outputs.",
            "tags": ["projects"],
            "security": _SECURED,
            "responses": {
                "200": _json("The project.", _PROJECT_REF),
                "400": _BAD_ID,
                "401": _UNAUTHORIZED,
                "404": _error("Not tracked."),
            },
        },
        "delete": {
            "operationId": "untrackProject",
            "summary": "Stop tracking a project. Nothing is deleted on Magic Hour or on disk.",
            "tags": ["projects"],
            "security": _SECURED,
            "responses": {
                "204": {"description": "No longer tracked."},
                "400": _BAD_ID,
                "401": _UNAUTHORIZED,
                "404": _error("Not tracked."),
            },
        },
    },
    "/webhooks/magic-hour": {
        "post": {
            "operationId": "magicHourWebhook",
            "summary": "Receive a Magic Hour webhook event; its project is polled at once.",
            "description": (
                "Signed with HMAC-SHA256 over `{timestamp}.{raw body}` keyed with "
                "WATCHER_WEBHOOK_SECRET; timestamps more than 5 minutes away are refused."
            ),
            "tags": ["webhooks"],
            "parameters": [
                {
                    "name": "magic-hour-event-signature",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                },
                {
                    "name": "magic-hour-event-timestamp",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/WebhookEvent"}}
                },
            },
            "responses": {
                "200": _json(
                    "Accepted (also for duplicates and event types the watcher ignores).",
                    {"$ref": "#/components/schemas/WebhookAnswer"},
                ),
                "400": _error("Correctly signed, but not an event the watcher can read."),
                "401": _error("Missing, malformed, stale or wrong signature."),
                "404": _error("Webhooks are off: WATCHER_WEBHOOK_SECRET is not set."),
                "413": _error("The body is larger than 256 KiB."),
            },
        }
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may not change the shared one)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Magic Hour watcher",
            "version": __version__,
            "description": (
                "Control plane of the watcher: track Magic Hour projects, read their state, "
                "probe health, scrape metrics and receive Magic Hour webhooks. Routes under "
                "/v1 need `Authorization: Bearer <WATCHER_CONTROL_TOKEN>` when a token is set. "
                "Every route but the webhook answers 400 `host_not_allowed` to a Host that is "
                "not an IP address, localhost or a name in WATCHER_HTTP_ALLOWED_HOSTS, 403 "
                "`cross_site_request` to a request from another site's web page, and 415 "
                "`unsupported_media_type` to a body not sent as application/json."
            ),
        },
        "paths": copy.deepcopy(_PATHS),
        "components": {
            "schemas": copy.deepcopy(_SCHEMAS),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The value of WATCHER_CONTROL_TOKEN.",
                }
            },
        },
    }
