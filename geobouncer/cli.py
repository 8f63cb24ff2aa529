"""Command line, with PgBouncer's flags: geobouncer [-d] [-q] [-v] [-u user] [-V] [-c] FILE."""

from __future__ import annotations

from gevent import monkey

# Patch the standard library before anything else is imported, so user hooks
# that do network I/O yield instead of blocking every client.
monkey.patch_all()

import logging
import os
import sys

import click

from . import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("-c", "--config", "config_opt", type=click.Path(dir_okay=False), help="Configuration file.")
@click.option("-d", "--daemon", is_flag=True, help="Run in the background (needs logfile and pidfile).")
@click.option("-R", "--reboot", is_flag=True, hidden=True, help="Refused: removed in PgBouncer 1.26.")
@click.option("-q", "--quiet", is_flag=True, help="Do not log to stderr.")
@click.option("-v", "--verbose", count=True, help="Increase verbosity (repeatable).")
@click.option("-u", "--user", "run_as", help="Switch to this OS user at start-up.")
@click.option("-V", "--version", is_flag=True, help="Print the version and exit.")
@click.option("--check", is_flag=True, help="Validate the configuration and exit.")
def main(config_file, config_opt, daemon, reboot, quiet, verbose, run_as, version, check):
    """geobouncer: a PostgreSQL connection pooler, PgBouncer-compatible."""
    if version:
        click.echo(f"geobouncer {__version__}")
        return
    if reboot:
        _refuse_reboot()
    path = config_opt or config_file
    if not path:
        raise click.UsageError("a configuration file is required (geobouncer -c FILE)")
    from . import log as logsetup
    from .auth import AuthFileError
    from .config import ConfigError, load_config

    try:
        cfg = load_config(path)
        if check:
            from .app import Bouncer

            Bouncer(path)
            click.echo(f"{path}: configuration OK")
            return
    except (ConfigError, AuthFileError) as exc:
        click.echo(f"geobouncer: config error: {exc}", err=True)
        sys.exit(1)
    settings = cfg.pgbouncer
    logfile = cfg.resolve_path(settings.logfile) if settings.logfile else None
    detach = None
    if daemon:
        if not logfile or not settings.pidfile:
            click.echo("geobouncer: -d needs logfile and pidfile in the config", err=True)
            sys.exit(1)
        from .daemon import Detach

        detach = Detach()
        detach.fork()
        quiet = True

    def fail(text: str) -> None:
        """A start-up failure: in the log, and on stderr (the launcher's, with -d)."""
        log = logging.getLogger("geobouncer")
        logged = bool(log.handlers)
        if logged:
            log.critical("%s", text)
        if detach is not None:
            detach.failed(f"geobouncer: {text}")
        if quiet or not logged:      # otherwise the log line just went to stderr
            click.echo(f"geobouncer: {text}", err=True)
        sys.exit(1)

    try:
        run_as = run_as or settings.user
        if run_as and os.geteuid() == 0:
            _switch_user(run_as)
        logsetup.setup(logfile, quiet, verbose,
                       (settings.syslog_ident, settings.syslog_facility) if settings.syslog else None)
        from .app import Bouncer

        bouncer = Bouncer(path)
        if settings.workers > 1 and not os.environ.get("GEOBOUNCER_WORKER"):
            from .workers import (
                Supervisor,  # workers = N: supervise N of these processes
            )

            if detach is not None:
                detach.ready()
            sys.exit(Supervisor(path, cfg, quiet, verbose).run())
        bouncer.serve_forever(on_ready=detach.ready if detach is not None else None)
    except (ConfigError, AuthFileError) as exc:
        fail(f"config error: {exc}")
    except OSError as exc:
        fail(exc.strerror if exc.errno and exc.strerror else str(exc))


def _refuse_reboot() -> None:
    """PgBouncer 1.26 removed online restart (-R); it is refused the same way.
    A rolling restart of processes sharing the port (so_reuseport) replaces it."""
    long_form = any(arg.startswith("--reb") for arg in sys.argv[1:])
    click.echo("geobouncer: unrecognized option '--reboot'" if long_form
               else "geobouncer: invalid option -- 'R'", err=True)
    click.echo('Try "geobouncer --help" for more information.', err=True)
    click.echo("(online restart was removed in PgBouncer 1.26: use a rolling restart with "
               "so_reuseport, see README)", err=True)
    sys.exit(1)


def _switch_user(name: str) -> None:
    import pwd

    entry = pwd.getpwnam(name)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


if __name__ == "__main__":
    main()
