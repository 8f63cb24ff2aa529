"""Command line, with PgBouncer's flags: geobouncer [-d] [-q] [-v] [-u user] [-V] [-c] FILE."""

from __future__ import annotations

from gevent import monkey

# Patch the standard library before anything else is imported, so user hooks
# that do network I/O yield instead of blocking every client.
monkey.patch_all()

import os
import sys

import click

from . import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("-c", "--config", "config_opt", type=click.Path(dir_okay=False), help="Configuration file.")
@click.option("-d", "--daemon", is_flag=True, help="Run in the background (needs logfile and pidfile).")
@click.option("-R", "--reboot", is_flag=True, hidden=True, help="Not supported (PgBouncer online restart).")
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
    path = config_opt or config_file
    if not path:
        raise click.UsageError("a configuration file is required (geobouncer -c FILE)")
    if reboot:
        raise click.UsageError("-R (online restart) is not supported")
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
    if daemon:
        if not logfile or not settings.pidfile:
            click.echo("geobouncer: -d needs logfile and pidfile in the config", err=True)
            sys.exit(1)
        _daemonize()
        quiet = True
    run_as = run_as or settings.user
    if run_as and os.geteuid() == 0:
        _switch_user(run_as)
    logsetup.setup(logfile, quiet, verbose)
    from .app import Bouncer

    try:
        bouncer = Bouncer(path)
    except (ConfigError, AuthFileError) as exc:
        click.echo(f"geobouncer: config error: {exc}", err=True)
        sys.exit(1)
    try:
        if settings.workers > 1 and not os.environ.get("GEOBOUNCER_WORKER"):
            from .workers import Supervisor   # workers = N: supervise N of these processes

            sys.exit(Supervisor(path, cfg, quiet, verbose).run())
        bouncer.serve_forever()
    except OSError as exc:
        click.echo(f"geobouncer: {exc}", err=True)
        sys.exit(1)


def _daemonize() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def _switch_user(name: str) -> None:
    import pwd

    entry = pwd.getpwnam(name)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


if __name__ == "__main__":
    main()
