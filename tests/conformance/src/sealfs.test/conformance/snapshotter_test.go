// containerd's own snapshotter conformance suite (snapshots/testsuite) against
// containerd-sealfs-grpc, through containerd's proxy snapshotter client: exactly the path
// containerd takes to a [proxy_plugins] snapshotter. Each case gets a fresh daemon whose root
// is the directory the suite hands in.
//
// Built in GOPATH mode against Debian's packaged containerd source (no module downloads):
//
//	GO111MODULE=off GOPATH=$PWD/tests/conformance:/usr/share/gocode \
//	  SEALFS_DAEMON=$PWD/target/debug/containerd-sealfs-grpc \
//	  go test -v sealfs.test/conformance
//
// scripts/test.sh runs it, and conformance2 (containerd 2.x's suite) with Go and containerd's
// source from Debian's unstable suite.
package conformance

import (
	"context"
	"os"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"

	"sealfs.test/daemon"
)

func TestSealfsSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the suite mounts overlayfs: run as root")
	}
	testsuite.SnapshotterSuite(t, "sealfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		conn, stop, err := daemon.Start(ctx, root)
		if err != nil {
			return nil, nil, err
		}
		return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "sealfs"), stop, nil
	})
}
