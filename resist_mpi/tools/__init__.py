"""Side programs: the traffic model (`traffic`), the comparison figure (`plot`), what this
installation can do (`check`) and the simulated multi-node cluster (`cluster`)."""
