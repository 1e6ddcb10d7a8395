"""`python -m gpumerge` and the `gpumerge` console script. The signal handlers go in before anything else is
imported (the package's imports take tens of milliseconds, during which a signal would otherwise kill the process
without its one line)."""


def run() -> None:
    from gpumerge.signals import GUARD

    GUARD.install()
    from gpumerge.cli import run as cli_run

    cli_run()


if __name__ == "__main__":
    run()
