// Package deploy holds the Kubernetes manifests that put snapview on a
// cluster; this test decodes them strictly into the Kubernetes API types,
// so that a misspelt field fails here rather than on a cluster.
package deploy

import (
	"os"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	"sigs.k8s.io/yaml"

	"github.com/snapview/snapview/pkg/installer"
)

func decode(t *testing.T, file string, into any) {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(data, into); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

func TestManifests(t *testing.T) {
	var rc nodev1.RuntimeClass
	decode(t, "10-runtimeclass.yaml", &rc)
	if rc.Kind != "RuntimeClass" || rc.Handler != installer.Defaults().Handler {
		t.Errorf("RuntimeClass %s with handler %q, want the installer's default %q", rc.Name, rc.Handler, installer.Defaults().Handler)
	}

	var ds appsv1.DaemonSet
	decode(t, "20-daemonset.yaml", &ds)
	spec := ds.Spec.Template.Spec
	if ds.Kind != "DaemonSet" || len(spec.Containers) != 1 {
		t.Fatalf("DaemonSet %+v", ds)
	}
	c := spec.Containers[0]
	args := strings.Join(append(c.Command, c.Args...), " ")
	for _, want := range []string{"snapviewctl install", "--root /host", "--restart"} {
		if !strings.Contains(args, want) {
			t.Errorf("the installer's command %q lacks %q", args, want)
		}
	}
	hostRoot := slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool {
		return v.HostPath != nil && v.HostPath.Path == "/" && slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return m.Name == v.Name && m.MountPath == "/host"
		})
	})
	if !hostRoot || c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Errorf("the installer must see the host's root at /host, privileged")
	}
	for k, v := range ds.Spec.Template.Spec.NodeSelector {
		if rc.Scheduling == nil || rc.Scheduling.NodeSelector[k] != v {
			t.Errorf("the DaemonSet's node selector %s=%s is not the RuntimeClass's", k, v)
		}
	}

	// The uninstall Job: the same image and host mount, uninstall, and in
	// a directory kubectl apply -f deploy/ does not read.
	var job batchv1.Job
	decode(t, "uninstall/job.yaml", &job)
	if job.Kind != "Job" || len(job.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("Job %+v", job)
	}
	u := job.Spec.Template.Spec.Containers[0]
	if u.Image != c.Image || u.ImagePullPolicy != c.ImagePullPolicy {
		t.Errorf("the uninstall Job runs %s (%s), the DaemonSet %s (%s)", u.Image, u.ImagePullPolicy, c.Image, c.ImagePullPolicy)
	}
	if args := strings.Join(append(u.Command, u.Args...), " "); !strings.Contains(args, "snapviewctl uninstall --root /host --restart") {
		t.Errorf("the uninstall Job's command %q", args)
	}
	if u.SecurityContext == nil || u.SecurityContext.Privileged == nil || !*u.SecurityContext.Privileged || len(job.Spec.Template.Spec.Volumes) != 1 ||
		job.Spec.Template.Spec.Volumes[0].HostPath == nil || job.Spec.Template.Spec.Volumes[0].HostPath.Path != "/" {
		t.Errorf("the uninstall Job must see the host's root at /host, privileged")
	}

	var pod corev1.Pod
	decode(t, "30-example-pod.yaml", &pod)
	if pod.Spec.RuntimeClassName == nil || *pod.Spec.RuntimeClassName != rc.Name {
		t.Errorf("the example pod does not use RuntimeClass %s", rc.Name)
	}
	for k := range pod.Annotations {
		if !strings.HasPrefix(k, "io.snapview.") {
			t.Errorf("the example pod's annotation %s is not snapview's", k)
		}
	}
}
