"""pgbeat's tooling, beside the product: the benchmarks (`pgbeat bench`), the
soak-and-chaos run (`pgbeat chaos`) and the process fleet they and the tests start.
Only those two commands (lazily) and the tests import it; the daemons and the api never do."""
