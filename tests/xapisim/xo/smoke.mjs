// Xen Orchestra's own XAPI client (npm xen-api) against a simulated pool.
//
//   XAPISIM_URL=http://127.0.0.1:PORT/ XAPISIM_USER=root XAPISIM_PASSWORD=... \
//   XO_VM=web01 node smoke.mjs
//
// Connects with the client's default transport, lists the VMs from its object
// cache (filled by event.from), snapshots one with callAsync, exports the
// snapshot with getResource, waits on barrier(), destroys the snapshot and its
// disks, disconnects.  Every step is logged to stderr ("step: ..."); stdout gets
// one JSON line with what was seen.  Any error exits 1; the whole run is bounded
// by XO_TIMEOUT_MS (default 60 s, exit 3), so a step that hangs fails the run.
import { Xapi } from 'xen-api'

const timeoutMs = Number(process.env.XO_TIMEOUT_MS || 60000)
let step = 'start'
const hardStop = setTimeout(() => {
  console.error(`TIMEOUT: step "${step}" did not finish within ${timeoutMs} ms`)
  process.exit(3)
}, timeoutMs)

function begin(name) {
  step = name
  console.error(`step: ${name}`)
}

async function main() {
  const out = {}
  begin('connect')
  const xapi = new Xapi({
    url: process.env.XAPISIM_URL,
    auth: { user: process.env.XAPISIM_USER || 'root', password: process.env.XAPISIM_PASSWORD },
    allowUnauthorized: true,
    debounce: 50,
  })
  await xapi.connect()
  out.status = xapi.status

  begin('objectsFetched')
  await xapi.objectsFetched

  begin('list VMs')
  const vms = Object.values(xapi.objects.all).filter(
    o => o.$type === 'VM' && !o.is_a_template && !o.is_a_snapshot && !o.is_control_domain
  )
  out.vms = vms.map(vm => vm.name_label).sort()
  const name = process.env.XO_VM || 'web01'
  const vm = vms.find(o => o.name_label === name)
  if (vm === undefined) throw new Error(`no VM named ${name}`)

  begin('callAsync VM.snapshot')
  const snapRef = await xapi.callAsync('VM.snapshot', vm.$ref, 'xo-smoke')
  out.snapshot = snapRef

  begin('barrier(snapshot)')
  const snap = await xapi.barrier(snapRef)
  out.snapshotIsSnapshot = snap.is_a_snapshot
  out.snapshotOf = snap.snapshot_of === vm.$ref

  begin('getResource /export/')
  const res = await xapi.getResource('/export/', {
    query: { ref: snapRef, use_compression: 'zstd' },
  })
  let bytes = 0
  let head = null
  for await (const chunk of res.body) {
    if (head === null) head = Buffer.from(chunk.subarray(0, 4))
    bytes += chunk.length
  }
  out.exportBytes = bytes
  out.exportMagic = head === null ? '' : head.toString('hex')

  begin('export task')
  out.exportTaskResult = await res.task

  begin('barrier()')
  await xapi.barrier()

  begin('destroy snapshot')
  const vdis = []
  for (const vbdRef of snap.VBDs) {
    const vbd = xapi.getObjectByRef(vbdRef, undefined)
    if (vbd !== undefined && vbd.type === 'Disk' && !vbd.empty) vdis.push(vbd.VDI)
  }
  await xapi.callAsync('VM.destroy', snapRef)
  for (const vdi of vdis) await xapi.call('VDI.destroy', vdi)
  out.destroyedVdis = vdis.length

  begin('barrier() after destroy')
  await xapi.barrier()
  out.snapshotGoneFromCache = xapi.getObjectByRef(snapRef, undefined) === undefined
  out.vdisGoneFromCache = vdis.every(ref => xapi.getObjectByRef(ref, undefined) === undefined)

  begin('disconnect')
  const session = xapi.sessionId
  await xapi.disconnect()
  out.statusAfter = xapi.status
  // disconnect() sends session.logout without waiting for it: wait until the
  // pool has really ended the session (bounded by the hard timeout)
  begin('logout')
  const jsonrpc = new URL('./jsonrpc', process.env.XAPISIM_URL)
  for (;;) {
    const r = await fetch(jsonrpc, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'session.get_uuid', params: [session, session] }),
    })
    const body = await r.json()
    if (body.error !== undefined) {
      out.afterLogout = body.error.message
      break
    }
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  return out
}

main().then(
  out => {
    clearTimeout(hardStop)
    process.stdout.write(JSON.stringify(out) + '\n')
    process.exit(0)
  },
  error => {
    console.error(`FAILED at step "${step}":`, error)
    process.exit(1)
  }
)
