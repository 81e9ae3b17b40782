"""Saves the machine at icount 0 with and without the detstop plugin and prints both canonical hashes."""
import sys, os, json, subprocess, tempfile, shutil, time
sys.path.insert(0, '/work/proto/detstop')
import segment, canon
class A: pass
a = A(); a.mem=128; a.append=segment.DEFAULT_APPEND
a.kernel='/work/main/.tools/guest/vmlinuz'; a.initrd='/work/main/.tools/guest/initrd.cpio.gz'
for plugin in (False, True):
    d = tempfile.mkdtemp(prefix='ds0-')
    cmd = ['qemu-system-x86_64'] + segment.machine_args(a, d+'/con') + ['-qmp', f'unix:{d}/q,server=on,wait=off', '-S']
    if plugin: cmd += ['-plugin', '/work/proto/target/release/libdetstop.so,target=0']
    p = subprocess.Popen(cmd)
    q = segment.QMP(d+'/q')
    q.cmd('migrate-set-capabilities', capabilities=[{'capability':'mapped-ram','state':True}])
    out = f'/work/proto/detstop/runs/s0-plugin{int(plugin)}.sav'
    if os.path.exists(out): os.unlink(out)
    q.cmd('migrate', uri='file:'+out)
    while q.cmd('query-migrate')['status'] != 'completed': time.sleep(0.01)
    q.cmd('quit'); p.wait()
    h = canon.canonical_hash(out)
    print(plugin, h['hash'][:16], h['vmdesc_sha256'][:16])
    shutil.rmtree(d)
