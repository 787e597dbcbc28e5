"""The ntrain command line: run the server, submit and follow jobs, evaluate, predict.

    ntrain serve                        run a server (127.0.0.1:50051, metrics on :9101)
    ntrain train --epochs 2             submit a job and follow it with a progress bar
    ntrain jobs | describe | logs | model | watch | cancel | eval | predict | info | health

Client commands talk to --address (default $NTRAIN_ADDRESS or 127.0.0.1:50051),
with TLS when --tls-ca (or $NTRAIN_TLS_CA) names a CA, and a bearer token from
--token-file, $NTRAIN_TOKEN or $NTRAIN_TOKEN_FILE.
Every failure is one line on standard error and a non-zero exit status; set
NTRAIN_DEBUG=1 to see a traceback for an unexpected one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ntrain.client import (
    QUICK_TIMEOUT,
    AddressError,
    Client,
    CredentialsError,
    NtrainError,
    load_credentials,
)
from service.cli.exit_status import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError
from service.cli.parser import build_parser

DEBUG_ENV = "NTRAIN_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ntrain command; returns the exit status."""
    args = build_parser().parse_args(argv)
    address = getattr(args, "address", None)
    if address is not None and args.timeout is None:
        args.timeout = getattr(args, "default_timeout", QUICK_TIMEOUT)
    try:
        if address is None:
            return args.run(args)
        credentials = load_credentials(
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token_file=args.token_file,
        )
        with Client(
            address, credentials=credentials, timeout=args.timeout, model_timeout=args.timeout
        ) as args.client:
            return args.run(args)
    except CliError as error:
        return _fail(str(error), error.exit_code)
    except (CredentialsError, AddressError) as error:
        return _fail(str(error), EXIT_USAGE)
    except NtrainError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`ntrain jobs | head`): not an error worth a line.
        sys.stderr.close()
        return EXIT_OK
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        return _fail(
            f"unexpected error: {type(error).__name__}: {error} (set {DEBUG_ENV}=1 for a traceback)"
        )


def _fail(message: str, exit_code: int = EXIT_ERROR) -> int:
    print(f"ntrain: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
