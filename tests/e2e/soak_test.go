package e2e

import (
	"testing"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// TestSoakShort is a short version of `make soak`: 50 cycles sequential and
// in 8 streams, 50 containers in one pod-grouped shim, 16 creates at once.
// No cycle may fail, the pod shim's open files and goroutines must stay
// level, and the leak check (registered by setup) must find nothing.
func TestSoakShort(t *testing.T) {
	d := suite.daemon
	ctx := setup(t, d)
	cfg := harness.SoakConfig{Runtime: snapviewRT, Image: testImageID, Cycles: 50, Streams: 8, PodContainers: 50, SampleEvery: 10, Parallel: 16}
	rep, err := d.Soak(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var out testWriter
	rep.Print(&out, cfg)
	t.Log(out.String())
	for _, f := range rep.Failures {
		t.Error(f)
	}
	if flat, how := rep.Flat(); !flat {
		t.Errorf("the pod shim grew: %s", how)
	}
}

// testWriter collects output for t.Log.
type testWriter struct{ harness.SafeBuffer }
