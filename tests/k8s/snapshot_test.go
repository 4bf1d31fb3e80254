package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/snapview/snapview/tests/e2e/harness"
)

// snapviewctl runs the node's installed snapviewctl the way
// docs/snapshots.md tells an operator to from a cluster: kubectl exec into
// the DaemonSet's pod, nsenter into containerd's mount namespace, the
// host's (the pod has the host's PIDs and is privileged; this test machine
// keeps its PID 1's namespaces from root, so the test names containerd's
// PID, as the doc's second form does), pointed at the node's containerd,
// in CRI's namespace.
func (c *cluster) snapviewctl(args ...string) (string, error) {
	argv := append([]string{"-n", "kube-system", "exec", "ds/snapview-install", "--",
		"nsenter", "-t", strconv.Itoa(c.d.Pid()), "-m", "--",
		filepath.Join(c.node, "usr/local/bin/snapviewctl"), "--address", c.d.Address, "--state", c.d.State, "--namespace", k8sNamespace},
		args...)
	return c.k.run(nil, argv...)
}

// containerID returns the containerd id of a pod's first container.
func (c *cluster) containerID(pod string) (string, error) {
	out, err := c.k.run(nil, "get", "pod", pod, "-o", "jsonpath={.status.containerStatuses[0].containerID}")
	if err != nil {
		return "", err
	}
	id, ok := strings.CutPrefix(strings.TrimSpace(out), "containerd://")
	if !ok || id == "" {
		return "", fmt.Errorf("pod %s's container id %q", pod, out)
	}
	return id, nil
}

type k8sSnapshot struct {
	ID, Kind, Form, Image, Source, Dir string
}

// snapshots takes a container snapshot and a directory snapshot of the
// example pod's container from the DaemonSet's pod, runs a pod of the
// container snapshot as its image, and a pod of another image with the
// directory snapshot as a volume by pod annotation; both see what the
// example pod wrote. It returns the two snapshots' ids.
func (c *cluster) snapshots(ctx context.Context, t *testing.T) []string {
	t.Helper()
	if out, err := c.k.run(nil, "exec", "snapview-example", "--", "sh", "-c", "mkdir -p /data && echo from-the-pod > /data/note && echo changed > /etc/motd"); err != nil {
		t.Fatalf("kubectl exec: %q %v", out, err)
	}
	id, err := c.containerID("snapview-example")
	if err != nil {
		t.Fatal(err)
	}
	take := func(args ...string) k8sSnapshot {
		t.Helper()
		out, err := c.snapviewctl(append([]string{"snapshot", "create"}, args...)...)
		var s k8sSnapshot
		if err != nil || json.Unmarshal([]byte(out), &s) != nil || s.ID == "" || s.Source != id {
			t.Fatalf("snapshot create %v from the DaemonSet's pod: %q %v", args, out, err)
		}
		return s
	}
	whole := take("--name", "example", id)
	dir := take("--dir", "/data", id)
	if whole.Kind != "container" || whole.Form != "image" || dir.Kind != "directory" {
		t.Fatalf("snapshots %+v %+v", whole, dir)
	}
	// The example pod runs on, resumed.
	if out, err := c.k.run(nil, "exec", "snapview-example", "--", "cat", "/data/note"); err != nil || out != "from-the-pod\n" {
		t.Fatalf("the example pod after the snapshots: %q %v", out, err)
	}

	c.apply(t, fmt.Sprintf(restoredPod, whole.Image))
	c.apply(t, fmt.Sprintf(dirVolumePod, dir.ID))
	c.waitRunning(ctx, t, "snapview-restored")
	c.waitRunning(ctx, t, "snapview-dir-volume")
	if logs := c.waitLog(ctx, t, "default", "snapview-restored", "ready"); !strings.Contains(logs, "from-the-pod\nchanged\n") {
		t.Errorf("the pod of the container snapshot says:\n%s", logs)
	}
	if logs := c.waitLog(ctx, t, "default", "snapview-dir-volume", "ready"); !strings.Contains(logs, "from-the-pod\nwrite-refused\n") {
		t.Errorf("the pod with the directory snapshot as a volume says:\n%s", logs)
	}
	c.checkOneLeasePerLiveContainer(ctx, t)
	return []string{whole.ID, dir.ID}
}

// removeSnapshots checks that snapshot ls lists ids, removes them with
// snapshot rm, and checks that none is left.
func (c *cluster) removeSnapshots(ctx context.Context, t *testing.T, ids []string) {
	t.Helper()
	out, err := c.snapviewctl("snapshot", "ls")
	for _, id := range ids {
		if err != nil || !strings.Contains(out, id) {
			t.Errorf("snapshot ls after the pods went lacks %s: %q %v", id, out, err)
		}
	}
	if out, err := c.snapviewctl(append([]string{"snapshot", "rm"}, ids...)...); err != nil {
		t.Fatalf("snapshot rm: %q %v", out, err)
	}
	if out, err := c.snapviewctl("snapshot", "ls", "--json"); err != nil || strings.TrimSpace(out) != "[]" {
		t.Errorf("snapshot ls --json after rm: %q %v", out, err)
	}
	imgs, err := c.d.Client().ImageService().List(harness.Context(ctx, k8sNamespace))
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range imgs {
		if strings.HasPrefix(img.Name, "localhost/snapview/snapshot:") {
			t.Errorf("snapshot record %s left after rm", img.Name)
		}
	}
}

// restoredPod runs a container snapshot as its image (%s).
const restoredPod = `apiVersion: v1
kind: Pod
metadata:
  name: snapview-restored
spec:
  runtimeClassName: snapview
  terminationGracePeriodSeconds: 5
  containers:
    - name: app
      image: %s
      imagePullPolicy: IfNotPresent
      command: ["sh", "-c", "cat /data/note /etc/motd; echo ready; exec sleep 3600"]
`

// dirVolumePod mounts directory snapshot %s at /restored, by pod
// annotation, in a container of another image.
const dirVolumePod = `apiVersion: v1
kind: Pod
metadata:
  name: snapview-dir-volume
  annotations:
    io.snapview.volume.data: '{"snapshot":"%s","target":"/restored"}'
spec:
  runtimeClassName: snapview
  terminationGracePeriodSeconds: 5
  containers:
    - name: app
      image: docker.io/snapview/pause:latest
      imagePullPolicy: Never
      command: ["sh", "-c", "cat /restored/note; if touch /restored/x 2>/dev/null; then echo written; else echo write-refused; fi; echo ready; exec sleep 3600"]
`
