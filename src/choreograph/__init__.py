"""choreograph."""
