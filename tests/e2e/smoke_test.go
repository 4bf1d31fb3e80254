package e2e

import "testing"

func TestSmoke(t *testing.T) {
	ctx := setup(t, suite.daemon)
	r, err := start(ctx, t, suite.daemon, "smoke", runOpts{runtime: snapviewRT, args: []string{"sh", "-c", "echo hello; exit 3"}})
	if err != nil {
		t.Fatal(err)
	}
	code, err := r.wait(t)
	if err != nil || code != 3 {
		t.Fatalf("code %d err %v", code, err)
	}
	r.task.Delete(ctx)
	t.Log(r.stdout.String())
}
