"""API health: whether Magic Hour accepts our requests, and the secrets that decides it with.

One object, :class:`ApiHealth`, knows the API-wide conditions that stop or pause every project
at once, and nothing about any one project:

- a refused token (HTTP 401) or a request the API calls invalid for every project stops polling:
  claiming waits :data:`AUTH_RECHECK_SECONDS`, then one project probes; the projects the refusal
  put off are made due again (:attr:`ApiHealth.on_release`) once a call succeeds or a new token
  is read;
- a 402 (payment required) pauses polling for :data:`PAYMENT_PAUSE_SECONDS`, then one project
  probes;
- after a 401 the API client asks :meth:`ApiHealth.token_after_401` for the token, with its
  ``*_FILE`` read again, so a rotated secret is not a refusal; SIGHUP re-reads every ``*_FILE``
  secret through :meth:`ApiHealth.reload_secrets`. :attr:`ApiHealth.settings` are therefore
  the settings in force, secrets included, for everything that reads one at each use.

What a refusal does to the project that met it (the note, the retry) is
:mod:`watcher.workflow`'s; when to claim is :mod:`watcher.dispatcher`'s, which asks
:meth:`ApiHealth.paused` and :attr:`ApiHealth.probing`. The clock is read through ``now``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

import structlog
from pydantic import SecretStr

from watcher import clock, logs
from watcher.errors import (
    ApiError,
    ConfigError,
    InvalidRequest,
    PaymentRequired,
    TransientApiError,
    Unauthorized,
)
from watcher.metrics import Metrics
from watcher.settings import ENV_PREFIX, SECRET_FIELDS, Settings, reread_secret_files
from watcher.throttle import Throttle

log = structlog.get_logger("watcher")

AUTH_RECHECK_SECONDS = 300.0
PAYMENT_PAUSE_SECONDS = 60.0
UNAUTHORIZED_NOTE = (
    "unauthorized: Magic Hour refused the API token (HTTP 401); polling is stopped until it is "
    "accepted (check WATCHER_API_TOKEN)"
)
PAYMENT_NOTE = "payment required: Magic Hour answered HTTP 402; polling is paused until it is not"


@dataclass(frozen=True, slots=True)
class Refusal:
    """What an API-wide refusal means for the project that met it: the note every active
    project gets (``first``: this refusal began the condition), and when to try it again."""

    note: str
    retry_in: float
    first: bool


@dataclass(eq=False, repr=False)  # no repr: the settings hold the secrets in force
class ApiHealth:
    """The API-wide conditions and the secrets in force; see the module docstring."""

    settings: Settings
    _: KW_ONLY
    until_done: bool = False
    metrics: Metrics = field(default_factory=Metrics)
    now: Callable[[], float] = clock.now
    throttle: Throttle | None = None  # the API client's, to hold calls under way
    unauthorized: bool = field(init=False, default=False)
    payment_required: bool = field(init=False, default=False)
    answered: bool = field(init=False, default=False)  # a call of this run succeeded
    paused_until: float = field(init=False, default=0.0)
    probing: bool = field(init=False, default=False)
    set_token: Callable[[SecretStr], None] | None = field(init=False, default=None)  # the API's
    # Makes the projects a refused token put off due now (the dispatcher's).
    on_release: Callable[[set[str]], None] = lambda _ids: None
    _held_by_401: set[str] = field(init=False, default_factory=set)

    def paused(self, now: float) -> bool:
        """Whether claiming waits (a refusal's pause has not run out)."""
        return now < self.paused_until

    @property
    def stopped(self) -> bool:
        """Whether polling is stopped or paused by the API (a drain does not wait for it)."""
        return self.unauthorized or self.payment_required

    def ok(self) -> None:
        """A call was answered: whatever held polling is over."""
        self.answered = True
        if self.unauthorized:
            self._release_held()
        if self.unauthorized or self.payment_required:
            log.info("api_recovered")
        self.unauthorized = self.payment_required = self.probing = False

    def refused(self, exc: ApiError) -> Refusal | None:
        """An API-wide refusal (invalid request, 401, 402) begins or goes on; ``None`` for any
        other error, which is the project's alone."""
        if isinstance(exc, InvalidRequest | Unauthorized):  # an invalid request stops polling too
            first, self.unauthorized = not self.unauthorized, True
            retry_in = AUTH_RECHECK_SECONDS
        elif isinstance(exc, PaymentRequired):
            first, self.payment_required = not self.payment_required, True
            retry_in = PAYMENT_PAUSE_SECONDS
        else:
            return None
        if first:
            self._log_refusal(exc)
        self._pause(retry_in)
        if isinstance(exc, InvalidRequest):
            note = f"{exc}; polling is stopped until this is fixed"
        else:
            note = UNAUTHORIZED_NOTE if isinstance(exc, Unauthorized) else PAYMENT_NOTE
        return Refusal(note, retry_in, first)

    def _log_refusal(self, exc: ApiError) -> None:
        """Say once, when it begins, that a refusal stops (or pauses) polling, and what to do."""
        retry = f"one retry every {AUTH_RECHECK_SECONDS:g} s"
        if isinstance(exc, InvalidRequest):
            log.error("api_request_invalid", error=str(exc), action=f"polling stopped; {retry}")
        elif isinstance(exc, Unauthorized):
            check = "polling stopped; check WATCHER_API_TOKEN"
            action = check if self.until_done else f"{check}; {retry}"
            log.error("api_unauthorized", error=str(exc), action=action)
        else:
            retry = f"one retry every {PAYMENT_PAUSE_SECONDS:g} s"
            log.error("api_payment_required", error=str(exc), action=f"polling paused; {retry}")

    def hold(self, project_id: str) -> None:
        """``project_id`` was put off to the next recheck by a refused token: make it due again
        as soon as a token is accepted. If the pause is already over when the refusal's writes
        are done (a new token came meanwhile, by SIGHUP or a 401's re-read, or a call was
        answered), there is nothing to wait for: it is made due now."""
        if self.unauthorized and self.paused(self.now()):
            self._held_by_401.add(project_id)
        else:
            self.on_release({project_id})

    def on_retry(self, exc: TransientApiError, attempt: int, wait: float) -> None:
        """The API client retries a transient fault (its hook)."""
        self.metrics.retries.labels(exc.cause).inc()
        log.warning(
            "api_retry",
            cause=exc.cause,
            status_code=exc.status_code,
            attempt=attempt,
            retry_in=round(wait, 3),
            error=str(exc),
        )

    def _pause(self, seconds: float) -> None:
        """Stop claiming work and hold every API call already on its way, for ``seconds``."""
        self.paused_until = self.now() + seconds
        self.probing = True
        if self.throttle is not None:
            self.throttle.pause(seconds)

    def _release_held(self) -> None:
        held, self._held_by_401 = self._held_by_401, set()
        self.on_release(held)

    # --- secrets -------------------------------------------------------------------------------

    def reload_secrets(self, trigger: str) -> list[str]:
        """Read every ``*_FILE`` secret again (``trigger``: SIGHUP, or a 401) and use the ones
        that changed from now on: the API token in the next request, the control token and
        webhook secret in the next check, the notify secret in the next delivery. An unreadable
        or empty file is logged and changes nothing. Returns the ``*_FILE`` variables whose
        secret changed."""
        try:
            settings, changed = reread_secret_files(self.settings)
        except ConfigError as exc:
            log.error("secrets_reload_failed", trigger=trigger, error=str(exc))  # noqa: TRY400
            return []
        for name in SECRET_FIELDS:
            secret = getattr(settings, name)
            logs.register_secret(secret.get_secret_value() if secret else None)
        self.settings = settings
        if self.set_token is not None and settings.api_token is not None:
            self.set_token(settings.api_token)
        if changed or trigger == "SIGHUP":
            log.info("secrets_reloaded", trigger=trigger, changed=changed)
        if self.unauthorized and f"{ENV_PREFIX}API_TOKEN_FILE" in changed:
            self._try_new_token_now()
        return changed

    def token_after_401(self) -> SecretStr | None:
        """The API client's question after a 401: the token, its file read again."""
        if self.settings.api_token_file is None:
            return None
        self.reload_secrets("unauthorized")
        return self.settings.api_token

    def _try_new_token_now(self) -> None:
        """Polling is stopped by a refused token and a new one came: try it now, not at the
        next recheck (the first project probes; the rest follow once it is accepted)."""
        self.paused_until = 0.0
        if self.throttle is not None:
            self.throttle.resume()
        self._release_held()
