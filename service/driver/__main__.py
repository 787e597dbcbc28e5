"""`python -m service.driver`: the Ray job of a multi_worker ntrain job."""

import sys

from service.driver.ray_driver import main

sys.exit(main())
