// A stand-in for nerdctl's nested module mod/tigron, which nerdctl's go.mod
// replaces with a directory of its repository (./mod/tigron) that is not in
// the module zip the proxy serves. nerdctl's command imports one package of
// it, tig, through a non-test file (pkg/testutil/compose.go, reached from
// cmd/nerdctl/helpers/testing_linux.go) and calls only the methods below.
// Our own code, not a copy of tigron's; recheck on each nerdctl bump.
module github.com/containerd/nerdctl/mod/tigron

go 1.26.0
