package sweep

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mustTake(t *testing.T, root string, interval time.Duration) *Turn {
	t.Helper()
	turn, why, err := TakeTurn(root, interval)
	if err != nil {
		t.Fatal(err)
	}
	if turn == nil {
		t.Fatalf("no turn: %s", why)
	}
	return turn
}

func mustNotTake(t *testing.T, root string, interval time.Duration, reason string) {
	t.Helper()
	turn, why, err := TakeTurn(root, interval)
	if err != nil {
		t.Fatal(err)
	}
	if turn != nil {
		turn.Release()
		t.Fatal("took a turn that was not due")
	}
	if !strings.Contains(why, reason) {
		t.Fatalf("reason %q, want it to say %q", why, reason)
	}
}

func TestTurnOncePerInterval(t *testing.T) {
	root := t.TempDir()
	// Never swept: the first shim's turn.
	turn := mustTake(t, root, time.Minute)
	if !turn.Last.IsZero() {
		t.Fatalf("last sweep %v on a new node", turn.Last)
	}
	// Held: nobody else's, whatever the interval.
	mustNotTake(t, root, 0, "another shim is sweeping")
	done := time.Now()
	if err := turn.Finish(done); err != nil {
		t.Fatal(err)
	}
	// Within the interval: nobody's.
	mustNotTake(t, root, time.Minute, "within the interval")
	// Past it (a shorter interval stands for time passing): due again, and
	// the last sweep is the one recorded.
	time.Sleep(5 * time.Millisecond)
	turn = mustTake(t, root, time.Millisecond)
	if !turn.Last.Equal(done.UTC()) {
		t.Fatalf("last sweep %v, recorded %v", turn.Last, done)
	}
	turn.Release()
	// An interval of 0 sweeps at every start.
	mustTake(t, root, 0).Release()
}

// A shim that dies with the turn has recorded nothing and holds no lock
// (closing its descriptor is what its death does): the next shim sweeps at
// once, even within the interval of the sweep before.
func TestTurnOfADeadSweeper(t *testing.T) {
	root := t.TempDir()
	if err := mustTake(t, root, 0).Finish(time.Now().Add(-2 * time.Minute)); err != nil {
		t.Fatal(err)
	}
	dying := mustTake(t, root, time.Minute)
	mustNotTake(t, root, time.Minute, "another shim is sweeping")
	dying.Release()
	mustTake(t, root, time.Minute).Release()
}

func TestTurnFileUnreadable(t *testing.T) {
	root := t.TempDir()
	// Garbage, or a record from a clock far ahead: due.
	for _, body := range []string{"not a time\n", time.Now().Add(time.Hour).Format(time.RFC3339Nano)} {
		if err := os.WriteFile(filepath.Join(root, TurnFile), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		mustTake(t, root, time.Minute).Release()
	}
	// A symlink in its place is not followed.
	if err := os.Remove(filepath.Join(root, TurnFile)); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(t.TempDir(), "elsewhere")
	if err := os.Symlink(target, filepath.Join(root, TurnFile)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := TakeTurn(root, time.Minute); err == nil {
		t.Fatal("followed a symlink")
	}
	if _, err := os.Lstat(target); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("created the symlink's target: %v", err)
	}
}
