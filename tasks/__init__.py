"""Stage logic: plain, typed Python callable without Prefect."""
